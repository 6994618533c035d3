"""One ``ProviderSpec`` per provider: everything the rest of bulkmail knows about it.

Adding a provider is a transport module, a settings class in ``providers.settings``, a field
of that name on ``config.Settings`` and a spec here. The transport modules are imported
inside the spec's functions, so ``requests`` is only paid for by a job that sends through
Mailtrap, and ``status`` describing a job imports none of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from bulkmail.providers.base import FatalError, Provider
from bulkmail.providers.settings import (
    MailtrapSettings,
    OutboxSettings,
    ProviderSettings,
    SmtpSettings,
)

if TYPE_CHECKING:
    from bulkmail.config import Settings

S = TypeVar("S", SmtpSettings, MailtrapSettings, OutboxSettings)


def _as_is(section: S, data_dir: Path) -> S:
    return section


def _no_problem(section: S) -> str | None:
    return None


@dataclass(frozen=True)
class ProviderSpec(Generic[S]):
    """What bulkmail knows about one provider, its transport module apart."""

    name: str  # the --provider value, the Settings attribute and the config file table
    settings: type[S]
    default_rate: float  # emails per second when no rate is given (0: unlimited)
    needs_sender: bool  # False: a fallback sender is used when none is configured
    factory: Callable[[S, Path], Provider]  # the transport (settings, user data directory)
    account_key: Callable[[S], str]  # the shared rate-limit key; never contains a secret
    describe: Callable[[Mapping[str, Any]], str | None]  # from a job's recorded settings
    # what makes these settings unusable before any job exists (a message), or None
    problem: Callable[[S], str | None] = _no_problem
    # the settings with defaults that depend on the user data directory filled in
    with_defaults: Callable[[S, Path], S] = _as_is
    # the pre-flight check (settings, user data directory, timeout in seconds): what was
    # proved, one line; raises ConfigError (exit 2) or PreflightError (exit 3)
    check: Callable[[S, Path, float], str] | None = None


# --------------------------------------------------------------------------- smtp


def _smtp(s: SmtpSettings, data_dir: Path) -> Provider:
    from bulkmail.providers.smtp import SmtpProvider

    return SmtpProvider(s)


def _smtp_problem(s: SmtpSettings) -> str | None:
    from bulkmail.providers.smtp import config_problem

    return config_problem(s)


def _smtp_check(s: SmtpSettings, data_dir: Path, timeout: float) -> str:
    from bulkmail.providers.smtp import check

    return check(s, timeout)


def _smtp_account(s: SmtpSettings) -> str:
    return f"smtp:{s.username}@{s.host}:{s.port}"


def _smtp_describe(public: Mapping[str, Any]) -> str | None:
    if not public.get("host"):
        return None
    user = f"{public['username']}@" if public.get("username") else ""
    return f"smtp: {user}{public['host']}:{public.get('port')} ({public.get('security')})"


# --------------------------------------------------------------------------- mailtrap


def _mailtrap(s: MailtrapSettings, data_dir: Path) -> Provider:
    from bulkmail.providers.mailtrap import MailtrapProvider

    return MailtrapProvider(s)


def _mailtrap_problem(s: MailtrapSettings) -> str | None:
    from bulkmail.providers.mailtrap import config_problem

    return config_problem(s)


def _mailtrap_check(s: MailtrapSettings, data_dir: Path, timeout: float) -> str:
    from bulkmail.providers.mailtrap import check

    return check(s, timeout)


def _mailtrap_account(s: MailtrapSettings) -> str:
    digest = hashlib.sha256(s.token.encode()).hexdigest()[:12]
    return f"mailtrap:{s.api_url.rstrip('/')}/{s.inbox_id}:{digest}"


def _mailtrap_describe(public: Mapping[str, Any]) -> str | None:
    if not public.get("api_url"):
        return None
    inbox = f", sandbox inbox {public['inbox_id']}" if public.get("inbox_id") else ""
    return f"mailtrap: {public['api_url']}{inbox}"


# --------------------------------------------------------------------------- outbox


def _outbox(s: OutboxSettings, data_dir: Path) -> Provider:
    from bulkmail.providers.outbox import OutboxProvider

    return OutboxProvider(s, default_dir=data_dir / "outbox")


def _outbox_check(s: OutboxSettings, data_dir: Path, timeout: float) -> str:
    from bulkmail.providers.outbox import check

    return check(s, data_dir / "outbox")


def _outbox_account(s: OutboxSettings) -> str:
    return f"outbox:{s.dir}"


def _outbox_describe(public: Mapping[str, Any]) -> str | None:
    return f"outbox: .eml files in {public['dir']}" if public.get("dir") else None


def _outbox_defaults(s: OutboxSettings, data_dir: Path) -> OutboxSettings:
    # recorded on the job as it is, so resume writes to the same folder
    return s if s.dir else replace(s, dir=str(data_dir / "outbox"))


# --------------------------------------------------------------------------- the registry

SPECS: Mapping[str, ProviderSpec[Any]] = {
    spec.name: spec
    for spec in (
        ProviderSpec(
            name="smtp",
            settings=SmtpSettings,
            default_rate=0.1,
            needs_sender=True,
            factory=_smtp,
            account_key=_smtp_account,
            describe=_smtp_describe,
            problem=_smtp_problem,
            check=_smtp_check,
        ),
        ProviderSpec(
            name="mailtrap",
            settings=MailtrapSettings,
            default_rate=0.1,
            needs_sender=True,
            factory=_mailtrap,
            account_key=_mailtrap_account,
            describe=_mailtrap_describe,
            problem=_mailtrap_problem,
            check=_mailtrap_check,
        ),
        ProviderSpec(
            name="outbox",  # the default: a fresh install runs a whole job into files
            settings=OutboxSettings,
            default_rate=0.0,
            needs_sender=False,
            factory=_outbox,
            account_key=_outbox_account,
            describe=_outbox_describe,
            with_defaults=_outbox_defaults,
            check=_outbox_check,
        ),
    )
}
PROVIDERS = tuple(SPECS)
"""The provider names, in the order help and error messages list them."""


def _section(provider: str, settings: Settings) -> ProviderSettings:
    section: ProviderSettings = getattr(settings, provider)
    return section


def account_key(provider: str, settings: Settings) -> str:
    """The rate-limit key: one per provider account, so every process sending through the
    same account shares one limit. Never contains a secret (a token is hashed)."""
    return SPECS[provider].account_key(_section(provider, settings))


def check_provider(provider: str, settings: Settings) -> None:
    """Refuse settings that could not send a single message (a missing token, a port out of
    range, a password over plain text to a remote host) before any job exists: exit 2."""
    from bulkmail.errors import ConfigError

    problem = SPECS[provider].problem(_section(provider, settings))
    if problem is not None:
        raise ConfigError(problem)


DEFAULT_CHECK_TIMEOUT = 10.0
"""Seconds the pre-flight check waits for each step (connect, greeting, TLS, login)."""


def preflight(
    provider: str, settings: Settings, *, data_dir: Path, timeout: float | None = None
) -> str:
    """Prove that ``provider`` can send with ``settings`` without sending anything (SMTP:
    connect, greeting, EHLO, TLS, login, QUIT; Mailtrap: the token; outbox: the folder is
    writable) and return what was proved, one line. Each step waits at most ``timeout``
    seconds (default: the provider's ``timeout`` setting, at most 10 s). Raises
    ``ConfigError`` (exit 2) for unusable settings, ``PreflightError`` (exit 3) when the
    provider cannot be reached, secured or logged in to."""
    from bulkmail.errors import ConfigError

    spec = SPECS.get(provider)
    if spec is None:
        raise ConfigError(f"unknown provider {provider!r}")
    section = spec.with_defaults(_section(provider, settings), data_dir)
    if timeout is None:
        configured = getattr(section, "timeout", DEFAULT_CHECK_TIMEOUT)
        timeout = min(float(configured), DEFAULT_CHECK_TIMEOUT)
    if not timeout > 0:
        raise ConfigError(f"--timeout: must be a positive number of seconds, got {timeout:g}")
    if spec.check is None:
        return provider
    return spec.check(section, data_dir, timeout)


def with_defaults(provider: str, settings: Settings, *, data_dir: Path) -> Settings:
    """``settings`` with the provider's defaults that depend on the user data directory
    filled in (the outbox folder), as they are recorded on a new job."""
    section = _section(provider, settings)
    filled = SPECS[provider].with_defaults(section, data_dir)
    return settings if filled is section else replace(settings, **{provider: filled})


def make_provider(provider: str, settings: Settings, *, data_dir: Path) -> Provider:
    """The transport for ``provider`` built from ``settings`` (secrets included)."""
    spec = SPECS.get(provider)
    if spec is None:
        raise FatalError(f"unknown provider {provider!r}")
    return spec.factory(_section(provider, settings), data_dir)


def describe(provider: str, public: Mapping[str, Any]) -> str:
    """The provider and where it sends (the outbox folder, the SMTP server, the API), from
    the non-secret settings a job recorded; the bare name when they say nothing."""
    spec = SPECS.get(provider)
    return (spec.describe(public) if spec is not None else None) or provider
