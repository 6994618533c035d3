"""Transports behind one protocol. Modules are imported lazily: `requests` is only paid for
by a job that sends through Mailtrap."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bulkmail.config import Settings
from bulkmail.providers.base import (
    FatalError,
    PermanentError,
    Provider,
    ProviderError,
    TransientError,
)

__all__ = [
    "FatalError",
    "PermanentError",
    "Provider",
    "ProviderError",
    "TransientError",
    "account_key",
    "check_provider",
    "make_provider",
]


def account_key(provider: str, settings: Settings) -> str:
    """The rate-limit key: one per provider account, so every process sending through the
    same account shares one limit. Never contains a secret (a token is hashed)."""
    if provider == "smtp":
        s = settings.smtp
        return f"smtp:{s.username}@{s.host}:{s.port}"
    if provider == "mailtrap":
        m = settings.mailtrap
        digest = hashlib.sha256(m.token.encode()).hexdigest()[:12]
        return f"mailtrap:{m.api_url.rstrip('/')}/{m.inbox_id}:{digest}"
    return f"outbox:{settings.outbox.dir}"


def check_provider(provider: str, settings: Settings) -> None:
    """Refuse settings that could not send a single message (a missing token, a port out of
    range, a password over plain text to a remote host) before any job exists: exit 2."""
    from bulkmail.errors import ConfigError

    problem: str | None = None
    if provider == "smtp":
        from bulkmail.providers.smtp import config_problem

        problem = config_problem(settings.smtp)
    elif provider == "mailtrap":
        from bulkmail.providers.mailtrap import config_problem as mailtrap_problem

        problem = mailtrap_problem(settings.mailtrap)
    if problem is not None:
        raise ConfigError(problem)


def make_provider(provider: str, settings: Settings, *, data_dir: Path) -> Provider:
    if provider == "smtp":
        from bulkmail.providers.smtp import SmtpProvider

        return SmtpProvider(settings.smtp)
    if provider == "mailtrap":
        from bulkmail.providers.mailtrap import MailtrapProvider

        return MailtrapProvider(settings.mailtrap)
    if provider == "outbox":
        from bulkmail.providers.outbox import OutboxProvider

        return OutboxProvider(settings.outbox, default_dir=data_dir / "outbox")
    raise FatalError(f"unknown provider {provider!r}")
