"""The provider registry: one spec per provider, secrets marked once, transports lazy."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from bulkmail.config import Settings, load_settings
from bulkmail.errors import ConfigError
from bulkmail.providers import (
    PROVIDERS,
    SPECS,
    FatalError,
    account_key,
    check_provider,
    describe,
    make_provider,
    with_defaults,
)
from bulkmail.providers.settings import (
    MailtrapSettings,
    OutboxSettings,
    SmtpSettings,
    public_settings,
    secret_keys,
)


def test_every_provider_has_a_settings_section_of_its_name() -> None:
    assert PROVIDERS == ("smtp", "mailtrap", "outbox")
    settings = Settings()
    for name, spec in SPECS.items():
        assert spec.name == name
        assert type(settings.section(name)) is spec.settings
    assert {f.name for f in fields(Settings)} >= set(PROVIDERS)


def test_secrets_are_marked_once_and_never_public() -> None:
    assert secret_keys(SmtpSettings) == {"password"}
    assert secret_keys(MailtrapSettings) == {"token", "webhook_secret"}
    assert secret_keys(OutboxSettings) == frozenset()
    smtp = SmtpSettings(username="u", password="hunter2")
    mailtrap = MailtrapSettings(token="tok-secret")
    assert "hunter2" not in repr(smtp) and "tok-secret" not in repr(mailtrap)
    # the keys a job records, in this order: the same as before the mark existed
    assert list(public_settings(smtp)) == [
        "host",
        "port",
        "security",
        "username",
        "max_per_connection",
        "timeout",
        "return_path",  # issue 13: the VERP envelope sender is the job's transport too
    ]
    assert public_settings(mailtrap) == {
        "api_url": "https://send.api.mailtrap.io",
        "inbox_id": "",
        "category": "",
        "batch_size": 100,  # issue 13: recorded, so resume sends in the job's batch size
        "timeout": 30.0,
    }
    assert public_settings(OutboxSettings(dir="/x")) == {"dir": "/x"}
    full = Settings(smtp=smtp, mailtrap=mailtrap)
    for name in PROVIDERS:
        assert full.provider_public(name) == public_settings(full.section(name))


def test_a_readable_config_file_with_a_secret_earns_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "bulkmail.toml"
    path.write_text('[smtp]\nhost = "mx"\n[mailtrap]\ncategory = "c"\n', encoding="utf-8")
    path.chmod(0o644)
    assert load_settings(config=str(path), env={}).warnings == ()
    path.write_text('[mailtrap]\ntoken = "t"\n', encoding="utf-8")
    (warning,) = load_settings(config=str(path), env={}).warnings
    assert "holds a secret" in warning


def test_defaults_rate_and_sender_come_from_the_spec() -> None:
    settings = Settings()
    assert settings.default_rate("smtp") == settings.default_rate("mailtrap") == 0.1
    assert settings.default_rate("outbox") == 0.0
    assert Settings(rate=2.0).default_rate("outbox") == 2.0
    assert settings.sender_for("outbox") == "bulkmail@localhost"
    with pytest.raises(ConfigError, match="the mailtrap provider needs a sender"):
        settings.sender_for("mailtrap")
    assert Settings(sender="a@b.example").sender_for("smtp") == "a@b.example"


def test_account_keys_hold_no_secret() -> None:
    settings = Settings(
        smtp=SmtpSettings(host="mx.example", port=25, username="me", password="pw-secret"),
        mailtrap=MailtrapSettings(token="tok-secret", api_url="https://a.example/", inbox_id="7"),
        outbox=OutboxSettings(dir="/out"),
    )
    assert account_key("smtp", settings) == "smtp:me@mx.example:25"
    key = account_key("mailtrap", settings)
    assert key.startswith("mailtrap:https://a.example/7:") and "tok-secret" not in key
    assert key != account_key("mailtrap", Settings(mailtrap=MailtrapSettings(token="other")))
    assert account_key("outbox", settings) == "outbox:/out"


def test_configuration_check_and_outbox_default_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMTP port 0"):
        check_provider("smtp", Settings(smtp=SmtpSettings(port=0)))
    with pytest.raises(ConfigError, match="needs a token"):
        check_provider("mailtrap", Settings())
    check_provider("outbox", Settings())
    filled = with_defaults("outbox", Settings(), data_dir=tmp_path)
    assert filled.outbox.dir == str(tmp_path / "outbox")
    given = Settings(outbox=OutboxSettings(dir="/mine"))
    assert with_defaults("outbox", given, data_dir=tmp_path) is given
    assert with_defaults("smtp", given, data_dir=tmp_path) is given


def test_factories_build_each_transport(tmp_path: Path) -> None:
    settings = Settings(mailtrap=MailtrapSettings(token="t"))
    for name in PROVIDERS:
        provider = make_provider(name, settings, data_dir=tmp_path)
        assert provider.name == name
        provider.close()
    with pytest.raises(FatalError, match="unknown provider 'pigeon'"):
        make_provider("pigeon", settings, data_dir=tmp_path)


def test_description_from_recorded_settings() -> None:
    assert describe("outbox", {"dir": "/o"}) == "outbox: .eml files in /o"
    assert describe("outbox", {}) == "outbox"
    smtp = {"host": "mx", "port": 587, "security": "starttls", "username": "u"}
    assert describe("smtp", smtp) == "smtp: u@mx:587 (starttls)"
    assert describe("smtp", {**smtp, "username": ""}) == "smtp: mx:587 (starttls)"
    api = {"api_url": "https://sandbox.api.mailtrap.io", "inbox_id": "9"}
    assert describe("mailtrap", api) == "mailtrap: https://sandbox.api.mailtrap.io, sandbox inbox 9"
    assert (
        describe("mailtrap", {**api, "inbox_id": ""}) == "mailtrap: https://sandbox.api.mailtrap.io"
    )
    assert describe("pigeon", {"host": "x"}) == "pigeon"


def test_transport_modules_are_imported_only_when_used() -> None:
    code = (
        "import sys\n"
        "from bulkmail.config import Settings\n"
        "from bulkmail.providers import account_key, describe\n"
        "describe('smtp', {'host': 'mx'}); account_key('mailtrap', Settings())\n"
        "print(sorted(m for m in ('requests', 'smtplib', 'bulkmail.providers.smtp',\n"
        "    'bulkmail.providers.mailtrap', 'bulkmail.providers.outbox') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
