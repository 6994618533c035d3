"""Settings: built-in defaults < config file (TOML) < BULKMAIL_* environment < flags.

Each provider's settings class lives in ``bulkmail.providers.settings`` (its table in the
config file); ``bulkmail.providers.registry`` lists the providers. Secrets (SMTP password,
Mailtrap token: the fields marked secret there) come only from the environment or the config
file, never from a flag, and are never written to the job store. Nothing here runs at import time:
``load_settings`` is called by the CLI with the environment it was given.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bulkmail.errors import ConfigError
from bulkmail.providers.registry import PROVIDERS, SPECS
from bulkmail.providers.settings import (
    SMTP_SECURITY,
    ImapSettings,
    MailtrapSettings,
    OutboxSettings,
    ProviderSettings,
    SmtpSettings,
    is_path,
    is_secret,
    local_path,
    public_settings,
    secret,
)

__all__ = [
    "OUTBOX_FALLBACK_SENDER",
    "PROVIDERS",
    "SMTP_SECURITY",
    "DashboardSettings",
    "MailtrapSettings",
    "OutboxSettings",
    "ServeSettings",
    "Settings",
    "SmtpSettings",
    "find_config",
    "load_settings",
    "user_config_path",
]

OUTBOX_FALLBACK_SENDER = "bulkmail@localhost"
"""The sender of a provider that needs none configured (the outbox) when none is."""


SOURCE_KEYS = ("csv", "xlsx", "sheet", "db", "query")
"""The keys of a ``[dashboard.sources.NAME]`` table (``bulkmail.web.dashboard.NamedSource``)."""


@dataclass(frozen=True)
class DashboardSettings:
    """``[dashboard]``: what ``bulkmail serve`` offers the dashboard and the HTTP API.

    ``sources``: name -> the source's keys (``csv``, ``xlsx`` and ``sheet``, or ``db`` and
    ``query``; paths absolute), from ``[dashboard.sources]``, where a plain string is a CSV
    or .xlsx file. ``templates`` / ``attachments``: the folders whose files a request may
    name. ``secret_key`` signs the session cookie (env BULKMAIL_DASHBOARD_SECRET_KEY)."""

    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict, metadata={"table": True})
    templates: str = local_path()
    attachments: str = local_path()
    secret_key: str = secret()


@dataclass(frozen=True)
class ServeSettings:
    """``[serve]``: the certificate and key ``bulkmail serve`` serves HTTPS with, when no
    ``--cert/--key`` is given (env BULKMAIL_SERVE_CERT, BULKMAIL_SERVE_KEY)."""

    cert: str = local_path()
    key: str = local_path()


@dataclass(frozen=True)
class Settings:
    provider: str = ""  # empty: nothing configured -> outbox
    sender: str = ""  # the "from" key
    rate: float | None = None  # None: the provider's default
    burst: int = 1
    store: str = ""  # empty: bulkmail.db in the user data directory
    reply_to: str = ""  # Reply-To of every message (--reply-to)
    cc: tuple[str, ...] = ()  # a copy of every message to these (--cc)
    bcc: tuple[str, ...] = ()  # a blind copy of every message to these (--bcc)
    # the course database URL with its password, for a worker's --recheck of a job whose
    # recorded URL lost it (never a recipient source: that is --db)
    db: str = ""
    # seconds of nothing but throttling replies before a worker pauses the job (None: the
    # manager's default)
    throttle_pause: float | None = None
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    mailtrap: MailtrapSettings = field(default_factory=MailtrapSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    imap: ImapSettings = field(default_factory=ImapSettings)  # `bulkmail bounces --imap`
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)  # `bulkmail serve`
    serve: ServeSettings = field(default_factory=ServeSettings)  # `bulkmail serve` HTTPS
    warnings: tuple[str, ...] = ()
    config_path: str = ""

    @property
    def provider_name(self) -> str:
        return self.provider or "outbox"

    def default_rate(self, provider: str) -> float:
        """Emails per second when no rate is given: the provider's default (0.1 for real
        transports, unlimited (0) for the outbox)."""
        if self.rate is not None:
            return self.rate
        return SPECS[provider].default_rate

    def sender_for(self, provider: str) -> str:
        if self.sender:
            return self.sender
        if not SPECS[provider].needs_sender:
            return OUTBOX_FALLBACK_SENDER
        raise ConfigError(
            f"the {provider} provider needs a sender: pass --from ADDR or set BULKMAIL_FROM "
            "(or `from` under [defaults] in the config file)"
        )

    def section(self, provider: str) -> ProviderSettings:
        """The settings of one provider (``self.smtp`` for ``"smtp"``)."""
        section: ProviderSettings = getattr(self, provider)
        return section

    def provider_public(self, provider: str) -> dict[str, Any]:
        """The provider's non-secret settings, recorded on the job so resume uses the same
        transport (secrets are read again then)."""
        return public_settings(self.section(provider))

    def with_provider_public(self, provider: str, public: Mapping[str, Any]) -> Settings:
        """These settings with a job's recorded non-secret provider settings on top (resume)."""
        section = self.section(provider)
        known = {f.name for f in fields(section)}
        values = {k: v for k, v in public.items() if k in known}
        merged: dict[str, Any] = {provider: replace(section, **values)}
        return replace(self, provider=provider, **merged)


# key in [defaults] -> Settings attribute
_DEFAULT_KEYS = {
    "provider": "provider",
    "from": "sender",
    "rate": "rate",
    "burst": "burst",
    "store": "store",
    "reply_to": "reply_to",
    "cc": "cc",
    "bcc": "bcc",
    "db": "db",
    "throttle_pause": "throttle_pause",
}
_DEFAULT_TYPES = {
    "rate": "float",
    "burst": "int",
    "cc": "list",
    "bcc": "list",
    "throttle_pause": "float",
}
# config sections that are not providers: name -> settings class (a Settings attribute)
_OTHER_SECTIONS: dict[str, type[Any]] = {
    "imap": ImapSettings,
    "dashboard": DashboardSettings,
    "serve": ServeSettings,
}


def user_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("bulkmail")) / "bulkmail.toml"


def find_config(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, else BULKMAIL_CONFIG, else ./bulkmail.toml, else
    the user config directory's bulkmail.toml; None when none exists (an explicit path that
    does not exist is an error)."""
    named = explicit or env.get("BULKMAIL_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    for candidate in (Path("bulkmail.toml"), user_config_path()):
        if candidate.is_file():
            return candidate
    return None


def _coerce(where: str, value: Any, to: type | str) -> Any:
    kind = to if isinstance(to, str) else to.__name__
    if kind == "list":  # addresses: a TOML list of strings, or one comma-separated string
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: expected a list of addresses, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    try:
        if "float" in kind:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if "int" in kind:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if "str" in kind:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = kind.split("|")[0].strip()
        wanted = {"float": "number", "int": "whole number", "str": "string"}.get(name, name)
        raise ConfigError(f"{where}: expected a {wanted}, got {value!r}") from None
    return value


def _local_path(value: str, base: Path) -> str:
    """A path setting made absolute (``~`` expanded, relative to ``base``); "" stays ""."""
    if not value:
        return value
    expanded = Path(value).expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)


def _has_password(url: str) -> bool:
    """Whether a database URL holds a password (user:password@host, or ?password=)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return bool(url) and (parts.password is not None or "password" in parse_qs(parts.query))
    except ValueError:
        return False


def _dashboard_sources(where: str, table: Any, base: Path) -> dict[str, dict[str, str]]:
    """``[dashboard.sources]``: NAME = "file.csv" (or .xlsx), or a table of SOURCE_KEYS
    (``db`` and ``query``: a course database and the server's query, never a client's)."""
    if not isinstance(table, dict):
        raise ConfigError(f'{where}: expected a table of NAME = "path", got {table!r}')
    sources: dict[str, dict[str, str]] = {}
    for name, value in table.items():
        at = f"{where}.{name}" if isinstance(value, dict) else f"{where} {name}"
        if isinstance(value, str):
            kind = "xlsx" if value.lower().endswith(".xlsx") else "csv"
            value = {kind: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a path or a table, got {value!r}")
        unknown = set(value) - set(SOURCE_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r}")
        keys = {k: _coerce(f"{at} {k}", v, "str") for k, v in value.items()}
        kinds = [k for k in ("csv", "xlsx", "db") if keys.get(k)]
        if len(kinds) != 1:
            raise ConfigError(f"{at}: give exactly one of csv, xlsx or db")
        if ("query" in keys) != (kinds[0] == "db") or ("sheet" in keys and kinds[0] != "xlsx"):
            raise ConfigError(f"{at}: query goes with db (and only with it), sheet with xlsx")
        for k in ("csv", "xlsx"):
            if k in keys:
                keys[k] = _local_path(keys[k], base)
        sources[str(name)] = keys
    return sources


def load_settings(*, config: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults < config file < environment. Flags are applied by the caller on top."""
    env = os.environ if env is None else env
    path = find_config(config, env)
    warnings: list[str] = []
    data: dict[str, Any] = {}
    mode = 0
    if path is not None:
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc}") from None
        if os.name == "posix" and mode & stat.S_IWOTH:
            # whoever can change it can send the mail elsewhere, or read the secrets
            raise ConfigError(
                f"{path}: refusing a config file that every user can change (world-writable): "
                f"chmod 600 {path}"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    top: dict[str, Any] = {}
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    for key, value in defaults.items():
        if key not in _DEFAULT_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} in [defaults]")
        attr = _DEFAULT_KEYS[key]
        top[attr] = _coerce(f"{path}: [defaults] {key}", value, _DEFAULT_TYPES.get(attr, "str"))
    classes: dict[str, type[Any]] = {n: s.settings for n, s in SPECS.items()}
    classes.update(_OTHER_SECTIONS)
    sections: dict[str, dict[str, Any]] = {name: {} for name in classes}
    has_secret = False
    dashboard = data.get("dashboard", {})
    if isinstance(dashboard, dict) and "sources" in dashboard:
        dashboard = dict(dashboard)
        base = path.absolute().parent if path is not None else Path.cwd()
        where = f"{path}: [dashboard.sources]"
        sections["dashboard"]["sources"] = _dashboard_sources(where, dashboard.pop("sources"), base)
        data = {**data, "dashboard": dashboard}
    for name, cls in classes.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        declared = {f.name: f for f in fields(cls) if not f.metadata.get("table")}
        for key, value in table.items():
            if key not in declared:
                raise ConfigError(f"{path}: unknown key {key!r} in [{name}]")
            value = _coerce(f"{path}: [{name}] {key}", value, declared[key].type)
            if is_path(declared[key]) and path is not None:
                value = _local_path(value, path.absolute().parent)
            sections[name][key] = value
            has_secret = has_secret or (is_secret(declared[key]) and bool(value))
    db_urls = [str(top.get("db", "") or "")]
    db_urls += [src.get("db", "") for src in sections["dashboard"].get("sources", {}).values()]
    has_secret = has_secret or any(_has_password(url) for url in db_urls)
    unknown = set(data) - {"defaults", *classes}
    if unknown:
        raise ConfigError(f"{path}: unknown section [{sorted(unknown)[0]}]")
    if has_secret and os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(f"{path} holds a secret and other users can read it: chmod 600 {path}")

    # environment: BULKMAIL_<KEY> for [defaults], BULKMAIL_<SECTION>_<KEY> otherwise
    for key, attr in _DEFAULT_KEYS.items():
        var = f"BULKMAIL_{key.upper()}"
        value = env.get(var)
        if value is not None and value != "":
            # checked here, so an error names the variable rather than the config file
            top[attr] = _coerce(var, value, _DEFAULT_TYPES.get(attr, "str"))
    for name, cls in classes.items():
        for f in fields(cls):
            if f.metadata.get("table"):
                continue  # a table has no variable ([dashboard.sources])
            var = f"BULKMAIL_{name.upper()}_{f.name.upper()}"
            if env.get(var) is not None:
                value = _coerce(var, env[var], f.type)
                sections[name][f.name] = _local_path(value, Path.cwd()) if is_path(f) else value

    where = f"{path}: [defaults]" if path else "BULKMAIL_*"
    provider = str(top.get("provider", "") or "")
    if provider and provider not in PROVIDERS:
        raise ConfigError(
            f"{where} provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}"
        )
    rate = top.get("rate")
    pause = top.get("throttle_pause")
    if pause is not None and pause <= 0:
        named = (
            "BULKMAIL_THROTTLE_PAUSE"
            if env.get("BULKMAIL_THROTTLE_PAUSE")
            else f"{where} throttle_pause"
        )
        raise ConfigError(f"{named}: must be a positive number of seconds, got {pause}")
    settings = Settings(
        provider=provider,
        sender=str(top.get("sender", "") or ""),
        rate=None if rate is None else _coerce(f"{where} rate", rate, "float"),
        burst=_coerce(f"{where} burst", top.get("burst", 1), "int"),
        store=str(top.get("store", "") or ""),
        reply_to=str(top.get("reply_to", "") or ""),
        cc=tuple(top.get("cc", ())),
        bcc=tuple(top.get("bcc", ())),
        db=str(top.get("db", "") or ""),
        throttle_pause=pause,
        warnings=tuple(warnings),
        config_path=str(path or ""),
    )
    built: dict[str, Any] = {name: cls(**sections[name]) for name, cls in classes.items()}
    settings = replace(settings, **built)
    if settings.smtp.security not in SMTP_SECURITY:
        raise ConfigError(
            f"smtp security: must be one of {', '.join(SMTP_SECURITY)}, "
            f"got {settings.smtp.security!r}"
        )
    return settings
