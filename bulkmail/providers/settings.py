"""Each provider's settings: one frozen dataclass per provider, its fields the keys of the
provider's config file table (``[smtp]``) and environment variables (``BULKMAIL_SMTP_HOST``).

A secret field is marked once, with ``secret()``: it is never shown (``repr``) and never
recorded on a job; ``public_settings`` is everything else but the host's own files
(``local_path()``: a CA file) and the account's caps, what a job records so that
``resume`` and ``retry`` use the same transport with the secrets and those files read again
at that time. The account's caps (``per_hour``, ``per_day``: ``account_cap()``) are not
secret but are not recorded with the transport either: they belong to the account, not to
one job.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

SMTP_SECURITY = ("none", "starttls", "tls")


def secret() -> str:
    """A secret string field: read from the environment or the config file only, never from
    a flag, never shown, never written to the job store."""
    return field(default="", repr=False, metadata={"secret": True})


def is_secret(f: Field[Any]) -> bool:
    return bool(f.metadata.get("secret"))


def local_path() -> str:
    """A path to a file of this host (a CA certificate file): ``~`` is expanded and a
    relative path made absolute when settings are loaded (against the config file's folder,
    or the current directory for an environment variable). Not recorded on a job: each
    process (a worker on another host sharing a PostgreSQL store) reads its own."""
    return field(default="", metadata={"path": True, "local": True})


def is_path(f: Field[Any]) -> bool:
    return bool(f.metadata.get("path"))


def login_setting(default: str) -> str:
    """A setting of how this host logs in (the SMTP AUTH mechanism): like the password it
    goes with, read again by every run rather than recorded on a job."""
    return field(default=default, metadata={"local": True})


def is_recorded(f: Field[Any]) -> bool:
    """True for a field a job records: neither a secret nor a host's own file."""
    return not (is_secret(f) or f.metadata.get("local"))


def secret_keys(cls: type[Any]) -> frozenset[str]:
    """The names of the secret fields of a settings class."""
    return frozenset(f.name for f in fields(cls) if is_secret(f))


def account_cap() -> int:
    """A cap of the provider account (``per_hour``, ``per_day``; 0: none). Not secret, but
    not part of the transport a job records either: caps belong to the account, so every
    run reads them from today's config and environment."""
    return field(default=0, metadata={"account": True})


def is_account_cap(f: Field[Any]) -> bool:
    return bool(f.metadata.get("account"))


def public_settings(section: ProviderSettings) -> dict[str, Any]:
    """The non-secret transport fields of a provider's settings (a host's own files and the
    account's caps apart), in field order: what a job records."""
    return {
        f.name: getattr(section, f.name)
        for f in fields(section)
        if is_recorded(f) and not is_account_cap(f)
    }


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "localhost"
    port: int = 587
    security: str = "starttls"  # one of SMTP_SECURITY
    username: str = ""
    password: str = secret()
    max_per_connection: int = 100
    timeout: float = 30.0
    ca_file: str = local_path()  # PEM certificates added to the system trust store (a private CA)
    per_hour: int = account_cap()
    per_day: int = account_cap()
    auth_method: str = login_setting("auto")  # auto (PLAIN, else LOGIN), plain, login, cram-md5
    # an opt-in VERP envelope sender, e.g. "bounces+{token}@example.edu": each message's
    # bounce comes back to an address naming its delivery (``bulkmail bounces --return-path``)
    return_path: str = ""


@dataclass(frozen=True)
class MailtrapSettings:
    token: str = secret()
    api_url: str = "https://send.api.mailtrap.io"
    inbox_id: str = ""  # set (a positive integer): the sandbox path /api/send/{inbox_id}
    category: str = ""
    batch_size: int = 100  # messages per /api/batch request (1..500); 1: one /api/send each
    timeout: float = 30.0
    ca_file: str = local_path()  # PEM certificates added to the system trust store (a private CA)
    per_hour: int = account_cap()
    per_day: int = account_cap()
    webhook_secret: str = secret()  # the webhook's signing secret (`bulkmail serve`)


@dataclass(frozen=True)
class OutboxSettings:
    dir: str = ""  # empty: outbox/ in the user data directory
    per_hour: int = account_cap()
    per_day: int = account_cap()


@dataclass(frozen=True)
class ImapSettings:
    """``[imap]``: the mailbox `bulkmail bounces --imap` reads (not a provider)."""

    password: str = secret()
    ca_file: str = local_path()  # PEM certificates added to the system trust store
    timeout: float = 30.0


ProviderSettings = SmtpSettings | MailtrapSettings | OutboxSettings
