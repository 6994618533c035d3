"""SmtpProvider against a real aiosmtpd server on loopback (tests/smtp_sink.py)."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bulkmail.config import SmtpSettings
from bulkmail.models import Message
from bulkmail.providers.base import FatalError, PermanentError, Provider, TransientError
from bulkmail.providers.smtp import SmtpProvider, config_problem, is_loopback
from tests.smtp_sink import Rule, SmtpSink, free_port


def make_message(to: str = "ada@example.org", n: int = 1, **kw: Any) -> Message:
    msg = Message(
        from_email="office@example.edu",
        from_name="Course Office",
        to_email=to,
        to_name="Ada Lovelace",
        subject=f"Reminder {n}",
        text="Hello Ada,\n.\n..a line starting with a dot\nbye\n",
        message_id=f"<m{n}.{to.replace('@', '.')}@bulkmail.test>",
    )
    return replace(msg, **kw)


def settings_for(sink: SmtpSink, **kw: object) -> SmtpSettings:
    base = SmtpSettings(host=sink.host, port=sink.port, security="none", timeout=2.0)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def provider(smtp_sink: SmtpSink) -> Iterator[SmtpProvider]:
    p = SmtpProvider(settings_for(smtp_sink))
    yield p
    p.close()


def test_is_a_provider(provider: SmtpProvider) -> None:
    p: Provider = provider
    assert p.name == "smtp"


def test_delivers_message_with_headers_and_body(
    smtp_sink: SmtpSink, provider: SmtpProvider
) -> None:
    msg = make_message(to_name="Zoë Ñúñez-Łukasiewicz", subject="Rappel : échéance ✓")
    assert provider.send(msg) is None  # aiosmtpd's reply carries no queue id
    [got] = smtp_sink.messages
    assert got.mail_from == "office@example.edu"
    assert got.rcpt_tos == ["ada@example.org"]
    parsed = got.parse()
    assert parsed["Message-ID"] == msg.message_id
    assert parsed["Subject"] == "Rappel : échéance ✓"
    assert parsed["From"].addresses[0].display_name == "Course Office"
    assert parsed["To"].addresses[0].display_name == "Zoë Ñúñez-Łukasiewicz"
    assert parsed["To"].addresses[0].addr_spec == "ada@example.org"
    body = parsed.get_body(("plain",))
    assert body is not None
    # dot-stuffing round-trips: lines made of or starting with dots arrive unchanged
    assert body.get_content() == msg.text


def test_non_ascii_body_is_sent_as_8bitmime(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    provider.send(make_message(text="Grüße aus Köln — ça va ?\n"))
    body = smtp_sink.messages[0].parse().get_body(("plain",))
    assert body is not None and body.get_content() == "Grüße aus Köln — ça va ?\n"


def test_returns_queue_id_when_the_server_gives_one(smtp_sink: SmtpSink) -> None:
    smtp_sink.replies["ada@example.org"] = Rule("250 2.0.0 Ok: queued as 4F2A1B3C", at="data")
    p = SmtpProvider(settings_for(smtp_sink))
    try:
        assert p.send(make_message()) == "4F2A1B3C"
    finally:
        p.close()


def test_reuses_one_connection(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    for n in range(5):
        provider.send(make_message(n=n))
    assert smtp_sink.connections == 1
    assert {m.connection for m in smtp_sink.messages} == {1}
    assert len(smtp_sink.messages) == 5


def test_opens_lazily_and_close_is_idempotent(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink))
    assert smtp_sink.connections == 0
    p.close()
    p.send(make_message())
    p.close()
    p.close()
    p.send(make_message(n=2))  # usable again after close: opens a new connection
    p.close()
    assert smtp_sink.connections == 2


def test_reopens_after_max_per_connection(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink, max_per_connection=2))
    for n in range(5):
        p.send(make_message(n=n))
    p.close()
    assert [m.connection for m in smtp_sink.messages] == [1, 1, 2, 2, 3]
    assert smtp_sink.connections == 3


def test_reconnects_when_the_idle_connection_was_dropped(
    smtp_sink: SmtpSink, provider: SmtpProvider
) -> None:
    other = SmtpProvider(settings_for(smtp_sink))
    provider.send(make_message(n=1))
    other.send(make_message(n=2))
    smtp_sink.drop_connections()
    provider.send(make_message(n=3))  # no error: re-opened and retried
    other.send(make_message(n=4))
    other.close()
    assert [m.connection for m in smtp_sink.messages] == [1, 2, 3, 4]


def test_reconnects_after_a_421_idle_timeout(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    provider.send(make_message(n=1))
    smtp_sink.drop_connections(reply="421 4.4.2 Error: timeout exceeded")
    provider.send(make_message(n=2))
    assert [m.connection for m in smtp_sink.messages] == [1, 2]


def test_reconnects_after_the_server_restarted(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink))
    try:
        p.send(make_message(n=1))
        smtp_sink.stop()
        with SmtpSink(port=smtp_sink.port) as again:
            p.send(make_message(n=2))
            assert len(again.messages) == 1
    finally:
        p.close()


@pytest.mark.parametrize("at", ["rcpt", "data"])
@pytest.mark.parametrize(
    "reply",
    [
        "421 4.3.2 shutting down",
        "450 4.2.1 try later",
        "451 4.3.0 local error",
        "452 4.3.1 insufficient storage",
    ],
)
def test_4xx_is_transient(smtp_sink: SmtpSink, provider: SmtpProvider, at: str, reply: str) -> None:
    smtp_sink.replies["ada@example.org"] = Rule(reply, at=at)  # type: ignore[arg-type]
    with pytest.raises(TransientError) as err:
        provider.send(make_message())
    assert str(err.value) == reply
    assert not err.value.outcome_unknown
    # the connection is left usable (or re-opened after a 421) for the next recipient
    provider.send(make_message(to="bob@example.org"))
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["bob@example.org"]]
    assert smtp_sink.connections == (2 if reply.startswith("421") else 1)


@pytest.mark.parametrize("at", ["rcpt", "data"])
@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 mailbox unavailable",
        "552 5.3.4 message too big",
        "553 5.1.3 bad address syntax",
        "554 5.7.1 rejected as spam",
    ],
)
def test_5xx_is_permanent_with_the_server_text(
    smtp_sink: SmtpSink, provider: SmtpProvider, at: str, reply: str
) -> None:
    smtp_sink.replies["ada@example.org"] = Rule(reply, at=at)  # type: ignore[arg-type]
    with pytest.raises(PermanentError, match=f"^{re.escape(reply)}$"):
        provider.send(make_message())
    provider.send(make_message(to="bob@example.org"))
    assert smtp_sink.connections == 1
    assert len(smtp_sink.messages) == 1


def test_plain_string_reply_applies_at_rcpt(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    smtp_sink.replies["ada@example.org"] = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match=r"^550 5\.1\.1 no such user$"):
        provider.send(make_message())


def test_transient_then_accepted(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    smtp_sink.replies["ada@example.org"] = Rule("451 4.7.1 greylisted", times=2)
    for _ in range(2):
        with pytest.raises(TransientError):
            provider.send(make_message())
    provider.send(make_message())
    assert len(smtp_sink.messages) == 1


def test_drop_after_data_is_outcome_unknown(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    smtp_sink.replies["ada@example.org"] = Rule(drop=True, times=1)
    msg = make_message()
    with pytest.raises(TransientError) as err:
        provider.send(msg)
    assert err.value.outcome_unknown
    assert "may have accepted" in str(err.value)
    provider.send(msg)  # the retry carries the same Message-ID on a new connection
    ids = [m.parse()["Message-ID"] for m in smtp_sink.messages]
    assert ids == [msg.message_id, msg.message_id]
    assert smtp_sink.connections == 2


def test_timeout_waiting_for_the_final_reply_is_outcome_unknown(smtp_sink: SmtpSink) -> None:
    smtp_sink.replies["ada@example.org"] = Rule(at="data", delay=0.4, times=1)
    p = SmtpProvider(settings_for(smtp_sink, timeout=0.1))
    try:
        with pytest.raises(TransientError) as err:
            p.send(make_message())
        assert err.value.outcome_unknown
    finally:
        p.close()


def test_dropped_before_data_on_a_fresh_connection_is_plain_transient(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.delay = 0.3  # MAIL FROM times out: the server looks dead
    p = SmtpProvider(settings_for(smtp_sink, timeout=0.1))
    try:
        with pytest.raises(TransientError) as err:
            p.send(make_message())
        assert not err.value.outcome_unknown
        assert "MAIL FROM" in str(err.value)
    finally:
        p.close()


def test_slow_link_still_delivers(smtp_sink: SmtpSink, provider: SmtpProvider) -> None:
    smtp_sink.delay = 0.02
    for n in range(3):
        provider.send(make_message(n=n))
    times = [m.received_at for m in smtp_sink.messages]
    assert len(times) == 3 and times[2] - times[0] >= 0.1  # >= 3 replies of 20 ms apart


def test_login_to_loopback_over_plain_connection() -> None:
    with SmtpSink(auth=("office", "s3cret")) as sink:
        p = SmtpProvider(settings_for(sink, username="office", password="s3cret"))
        try:
            p.send(make_message())
        finally:
            p.close()
        assert len(sink.messages) == 1


def test_bad_login_is_fatal() -> None:
    with SmtpSink(auth=("office", "s3cret")) as sink:
        p = SmtpProvider(settings_for(sink, username="office", password="wrong"))
        with pytest.raises(FatalError, match=r"^SMTP login rejected for user office: 535 "):
            p.send(make_message())
        p.close()
        assert sink.messages == []


def test_server_requiring_auth_without_username_is_fatal() -> None:
    # aiosmtpd answers MAIL FROM with "530 5.7.0 Authentication required": no message
    # can go out with this configuration, so it must not fail recipients one by one
    with SmtpSink(auth=("office", "s3cret")) as sink:
        p = SmtpProvider(settings_for(sink))
        with pytest.raises(FatalError, match=r"requires authentication.*530 "):
            p.send(make_message())
        p.close()


def test_password_over_plain_to_remote_host_is_refused_without_connecting() -> None:
    calls: list[SmtpSettings] = []

    def factory(s: SmtpSettings) -> smtplib.SMTP:
        calls.append(s)
        raise AssertionError("must not connect")

    settings = SmtpSettings(
        host="192.0.2.1", port=25, security="none", username="office", password="s3cret"
    )
    p = SmtpProvider(settings, smtp_factory=factory)
    with pytest.raises(FatalError, match="refusing to send the SMTP password"):
        p.send(make_message())
    assert calls == []


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.1", False),
        ("smtp.example.edu", False),
        ("localhost.evil.example", False),
        ("0.0.0.0", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_connection_refused_is_transient() -> None:
    settings = SmtpSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2.0)
    p = SmtpProvider(settings)
    with pytest.raises(TransientError, match=r"^cannot connect to 127\.0\.0\.1:"):
        p.send(make_message())


def test_no_greeting_times_out_as_transient() -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never says 220
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        p = SmtpProvider(SmtpSettings(host="127.0.0.1", port=port, security="none", timeout=0.1))
        with pytest.raises(TransientError, match="timed out"):
            p.send(make_message())


def test_starttls_not_offered_is_fatal(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink, security="starttls"))
    with pytest.raises(FatalError, match="does not offer STARTTLS"):
        p.send(make_message())


def test_tls_against_a_plain_server_is_fatal(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink, security="tls"))
    with pytest.raises(FatalError, match="TLS failure"):
        p.send(make_message())
    assert smtp_sink.messages == []


def test_smtp_factory_hook_is_used(smtp_sink: SmtpSink) -> None:
    opened: list[str] = []

    def factory(s: SmtpSettings) -> smtplib.SMTP:
        opened.append(s.host)
        return smtplib.SMTP(s.host, s.port, timeout=s.timeout)

    p = SmtpProvider(settings_for(smtp_sink), smtp_factory=factory)
    p.send(make_message())
    p.close()
    assert opened == [smtp_sink.host]
    assert len(smtp_sink.messages) == 1


def test_standalone_sink_records_each_message(tmp_path: Path) -> None:
    record = tmp_path / "received.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.smtp_sink", "--port", "0", "--record", str(record)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        settings = SmtpSettings(host="127.0.0.1", port=int(ready[1]), security="none")
        p = SmtpProvider(settings)
        msgs = [make_message(n=1), make_message(to="bob@example.org", n=2)]
        for msg in msgs:
            p.send(msg)
        p.close()
        lines = [json.loads(line) for line in record.read_text().splitlines()]
        assert [(r["recipient"], r["message_id"]) for r in lines] == [
            (m.to_email, m.message_id) for m in msgs
        ]
        assert all(isinstance(r["time"], float) for r in lines)
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


# -- what the server offers: 8BITMIME, SIZE, AUTH mechanisms (issue 14) -------------------


def test_a_server_without_8bitmime_gets_only_7bit_bytes() -> None:
    with SmtpSink(eight_bit=False) as sink:
        p = SmtpProvider(settings_for(sink))
        try:
            p.send(
                make_message(subject="Grüße aus Köln", text="Grüße, Zoë!\n", html="<p>Grüße</p>")
            )
        finally:
            p.close()
        [got] = sink.messages
    assert got.data.isascii()
    assert not any(o.startswith("BODY=") for o in got.mail_options)
    parsed = got.parse()
    assert parsed["Subject"] == "Grüße aus Köln"
    plain, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert plain is not None and html is not None
    assert plain["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert plain.get_content().replace("\r\n", "\n") == "Grüße, Zoë!\n"
    assert html.get_content().replace("\r\n", "\n") == "<p>Grüße</p>\n"


def test_a_server_with_8bitmime_gets_8bit_declared(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink))
    try:
        p.send(make_message(text="Grüße\n"))
    finally:
        p.close()
    [got] = smtp_sink.messages
    assert "BODY=8BITMIME" in got.mail_options and not got.data.isascii()


def test_size_is_declared_on_mail_from_when_offered(smtp_sink: SmtpSink) -> None:
    p = SmtpProvider(settings_for(smtp_sink))
    try:
        p.send(make_message())
    finally:
        p.close()
    [got] = smtp_sink.messages
    [size] = [o for o in got.mail_options if o.startswith("SIZE=")]
    # the message as received (CRLF line ends, dots unstuffed) plus the stuffed dots
    assert int(size.removeprefix("SIZE=")) >= len(got.data)
    assert int(size.removeprefix("SIZE=")) <= len(got.data) + 10


def test_no_size_declared_when_not_offered() -> None:
    with SmtpSink(size_limit=None) as sink:
        p = SmtpProvider(settings_for(sink))
        try:
            p.send(make_message())
        finally:
            p.close()
        [got] = sink.messages
    assert not any(o.startswith("SIZE") for o in got.mail_options)


def test_a_message_over_the_servers_size_is_refused_before_upload() -> None:
    with SmtpSink(size_limit=2000) as sink:
        p = SmtpProvider(settings_for(sink))
        try:
            with pytest.raises(PermanentError, match=r"message of \d+ bytes .* 2000 bytes") as e:
                p.send(make_message(text="x" * 60 + "\n" * 50 + "y" * 3000))
            assert int(re.findall(r"\d+", str(e.value))[0]) > 2000
            p.send(make_message(n=2))  # the connection stays usable for the next one
        finally:
            p.close()
        assert [m.rcpt_tos for m in sink.messages] == [["ada@example.org"]]
        assert sink.commands.count("MAIL") == 1 and sink.commands.count("DATA") == 1


def test_a_wrong_password_costs_one_auth_attempt() -> None:
    with SmtpSink(auth=("office", "s3cret")) as sink:
        p = SmtpProvider(settings_for(sink, username="office", password="wrong"))
        with pytest.raises(FatalError, match="535"):
            p.send(make_message())
        assert sink.commands.count("AUTH") == 1
        assert sink.messages == []


@pytest.mark.parametrize("method", ["auto", "plain", "login", "LOGIN"])
def test_auth_method_picks_one_mechanism(method: str) -> None:
    with SmtpSink(auth=("office", "s3cret")) as sink:
        p = SmtpProvider(
            settings_for(sink, username="office", password="s3cret", auth_method=method)
        )
        try:
            p.send(make_message())
        finally:
            p.close()
        assert sink.commands.count("AUTH") == 1
        assert len(sink.messages) == 1


def test_auth_method_the_server_does_not_offer_is_fatal_without_trying() -> None:
    with SmtpSink(auth=("office", "s3cret")) as sink:
        s = settings_for(sink, username="office", password="s3cret", auth_method="cram-md5")
        p = SmtpProvider(s)
        with pytest.raises(FatalError, match=r"offers AUTH LOGIN PLAIN, not CRAM-MD5.*auth_method"):
            p.send(make_message())
        assert "AUTH" not in sink.commands


def test_unknown_auth_method_is_a_config_problem() -> None:
    s = SmtpSettings(auth_method="ntlm")
    assert config_problem(s) is not None
    assert "auth_method" in (config_problem(s) or "")
    assert config_problem(SmtpSettings(auth_method="cram-md5")) is None


def test_auth_method_is_read_from_the_environment_and_not_recorded(tmp_path: Path) -> None:
    from bulkmail.config import load_settings
    from bulkmail.providers.settings import public_settings

    s = load_settings(env={"BULKMAIL_SMTP_AUTH_METHOD": "login"}, config=None).smtp
    assert s.auth_method == "login"
    assert "auth_method" not in public_settings(s)


def test_a_verp_return_path_names_the_delivery_and_bounces_find_it(smtp_sink: SmtpSink) -> None:
    """`[smtp] return_path = "bounces+{token}@example.edu"`: MAIL FROM names the delivery
    (JOB.POSITION.TOKEN of its Message-ID), and `bulkmail bounces --return-path` reads a
    DSN sent there back to that delivery, even with no returned headers. A message that is
    not a delivery's (a --test-to message) keeps the sender's address."""
    from bulkmail.bounces import events_of, parse_dsn, verp_pattern
    from bulkmail.store.records import message_id, parse_message_id

    template = "bounces+{token}@example.edu"
    p = SmtpProvider(settings_for(smtp_sink, return_path=template))
    try:
        p.send(make_message(message_id=message_id(3, 7, "ab12cd34", "example.edu")))
        p.send(make_message(n=2, message_id="<test.1f2e@example.edu>"))
    finally:
        p.close()
    first, test = smtp_sink.messages
    assert first.mail_from == "bounces+3.7.ab12cd34@example.edu"
    assert test.mail_from == "office@example.edu"
    dsn = (
        b"From: MAILER-DAEMON@mx.example.org\r\nTo: bounces+3.7.ab12cd34@example.edu\r\n"
        b"Subject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nIt bounced.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; ada@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--b--\r\n"
    )
    parsed = parse_dsn(dsn)
    assert parsed is not None and parsed.original_message_id is None
    [event] = events_of(parsed, "k1", verp=verp_pattern(template), now=1.0)
    assert event.message_id is not None
    assert parse_message_id(event.message_id) == (3, 7, "ab12cd34")
    assert event.email == "ada@example.org" and "5.1.1" in (event.detail or "")


def test_a_return_path_without_its_token_is_refused_before_any_job() -> None:
    from bulkmail.providers.smtp import config_problem

    problem = config_problem(SmtpSettings(host="mx", return_path="bounces@example.edu"))
    assert problem is not None and "{token}" in problem
