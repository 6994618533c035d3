"""Issue 14, a first campaign that cannot go wrong: the pre-flight check (`bulkmail check`,
and `send-reminders` before it creates a job), `--test-to`, `--yes` off a terminal, job
names, `history`, a cron re-run with nothing new, the office's headers and the retry
countdown under the live bar. Real servers throughout: aiosmtpd (tests/smtp_sink.py), a
raw socket that never greets, pytest-httpserver for Mailtrap."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from rich.console import Console
from typer.testing import CliRunner

from bulkmail.cli import app
from bulkmail.cli.env import Environment, use
from bulkmail.compose import Composer, Templates
from bulkmail.manager import Event
from bulkmail.mime import to_bytes, to_bytes_fast
from bulkmail.models import Message, Recipient
from bulkmail.providers.mailtrap import MailtrapProvider
from bulkmail.providers.settings import MailtrapSettings
from bulkmail.store import open_store
from bulkmail.store.records import SCHEMA_VERSION
from bulkmail.ui import RunDisplay
from tests.e2e import EXAMPLES, bulkmail, data_dir, default_store
from tests.smtp_sink import Rule, SmtpSink, free_port

SEND = ["send-reminders", "--csv", str(EXAMPLES / "instructors.csv"), "--template",
        str(EXAMPLES / "reminder.txt"), "--subject", "Reminder: {{ course }}"]  # fmt: skip
SMTP = ["--provider", "smtp", "--from", "Course Office <office@example.edu>", "--rate", "0"]


def smtp_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "BULKMAIL_SMTP_HOST": "127.0.0.1",
        "BULKMAIL_SMTP_PORT": str(port),
        "BULKMAIL_SMTP_SECURITY": "none",
        **extra,
    }


def one_line(result: Any) -> str:
    assert result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return str(result.stderr.strip())


def jobs_in(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP listener that accepts connections and never says a word (not SMTP)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


# -- 1. the pre-flight check


def test_check_with_nothing_listening_fails_fast_naming_host_and_port() -> None:
    port = free_port()
    started = time.monotonic()
    result = bulkmail("check", "--provider", "smtp", env=smtp_env(port))
    assert time.monotonic() - started < 5
    assert result.exit_code == 3, result.output
    line = one_line(result)
    assert line.startswith(f"bulkmail: smtp 127.0.0.1:{port}: connection refused")


def test_check_of_a_listener_that_never_greets_is_not_smtp(silent_port: int) -> None:
    started = time.monotonic()
    result = bulkmail("check", "--provider", "smtp", "--timeout", "1", env=smtp_env(silent_port))
    assert time.monotonic() - started < 5
    assert result.exit_code == 3, result.output
    assert one_line(result).startswith(
        f"bulkmail: smtp 127.0.0.1:{silent_port}: not SMTP: no 220 greeting within 1 s"
    )


def test_check_logs_in_and_a_wrong_password_is_rejected() -> None:
    with SmtpSink(auth=("office", "secret")) as sink:
        env = smtp_env(sink.port, BULKMAIL_SMTP_USERNAME="office")
        wrong = bulkmail("check", "--provider", "smtp", env={**env, "BULKMAIL_SMTP_PASSWORD": "x"})
        assert wrong.exit_code == 3, wrong.output
        assert one_line(wrong).startswith(
            f"bulkmail: smtp 127.0.0.1:{sink.port}: login rejected for user office: 535"
        )
        ok = bulkmail(
            "check", "--provider", "smtp", env={**env, "BULKMAIL_SMTP_PASSWORD": "secret"}
        )
        assert ok.exit_code == 0, ok.output
        assert ok.stdout == f"ok: smtp office@127.0.0.1:{sink.port} (no TLS, login ok)\n"
        assert sink.messages == []


def test_check_of_bad_settings_is_exit_2() -> None:
    result = bulkmail("check", "--provider", "mailtrap")
    assert result.exit_code == 2
    assert "needs a token" in one_line(result)
    assert bulkmail("check", "--timeout", "0").exit_code == 2


def test_check_of_the_outbox_creates_nothing() -> None:
    result = bulkmail("check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: outbox ") and "(to be created)" in result.stdout
    assert not (data_dir() / "outbox").exists()


def test_mailtrap_check_proves_the_token_with_an_empty_batch(httpserver: HTTPServer) -> None:
    seen: list[dict[str, Any]] = []

    def batch(request: Any) -> Any:
        from werkzeug import Response

        seen.append(json.loads(request.get_data()))
        if request.headers.get("Authorization") != "Bearer right":
            return Response('{"errors": ["Unauthorized"]}', 401, mimetype="application/json")
        return Response('{"errors": ["requests: empty"]}', 400, mimetype="application/json")

    httpserver.expect_request("/api/batch", method="POST").respond_with_handler(batch)
    env = {"BULKMAIL_MAILTRAP_API_URL": httpserver.url_for("/")}
    wrong = bulkmail("check", "--provider", "mailtrap", env={**env, "BULKMAIL_MAILTRAP_TOKEN": "x"})
    assert wrong.exit_code == 3, wrong.output
    line = one_line(wrong)
    where = f"{httpserver.host}:{httpserver.port}"
    assert f"mailtrap {where}: token rejected (401 Unauthorized)" in line
    ok = bulkmail(
        "check", "--provider", "mailtrap", env={**env, "BULKMAIL_MAILTRAP_TOKEN": "right"}
    )
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == f"ok: mailtrap {httpserver.host}:{httpserver.port} (token accepted)\n"
    assert seen == [{"base": {}, "requests": []}] * 2  # nothing to send in it


def test_send_reminders_to_a_wrong_server_creates_no_job(silent_port: int) -> None:
    started = time.monotonic()
    result = bulkmail(*SEND, *SMTP, "--yes", "--timeout", "1", env=smtp_env(silent_port))
    assert time.monotonic() - started < 6
    assert result.exit_code == 3, result.output
    assert "not SMTP: no 220 greeting within 1 s" in one_line(result)
    assert not default_store().exists()
    refused = bulkmail(*SEND, *SMTP, "--yes", env=smtp_env(free_port()))
    assert refused.exit_code == 3 and "connection refused" in one_line(refused)
    assert not default_store().exists()


# -- 2. the live bar shows the last error and the retry countdown


def test_the_live_bar_counts_down_to_the_retry_with_the_error() -> None:
    now = [100.0]
    console = Console(force_terminal=True, width=100, record=True)
    display = RunDisplay(
        console, job_id=1, total=2, done=0, failed=0, live=True, clock=lambda: now[0]
    )
    with display.running():
        display.handle(Event("sending", "ada@example.edu"))
        error = "451 4.3.0 try again later"
        display.handle(Event("retry", "ada@example.edu", "Ada", error, 1, retry_in=10))
        note = display.note()
        assert note is not None and note.plain == f"retrying ada@example.edu in 10 s: {error}"
        now[0] += 4.5
        assert display.note().plain.startswith("retrying ada@example.edu in 6 s:")  # type: ignore[union-attr]
        now[0] += 10
        assert display.note().plain.startswith("retrying ada@example.edu now:")  # type: ignore[union-attr]
        display.handle(Event("sent", "ada@example.edu"))
        assert display.note().plain == f"last error: ada@example.edu: {error}"  # type: ignore[union-attr]
    assert f"last error: ada@example.edu: {error}" in console.export_text()


def test_a_retry_shows_under_the_bar_of_a_real_run(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        sink.replies["b.okafor@example.edu"] = Rule("451 4.3.0 greylisted, try later", times=1)
        env = Environment(
            stdout=Console(width=100),
            stderr=Console(stderr=True, force_terminal=True, width=120),
            stdin_isatty=True,
        )
        args = [*SEND, *SMTP, "--yes", "--backoff", "0", "--store", str(tmp_path / "s.db")]
        with use(env):
            result = CliRunner().invoke(app, args, env=smtp_env(sink.port))
        assert result.exit_code == 0, result.output
        assert "last error: b.okafor@example.edu: 451 4.3.0 greylisted, try later" in (
            result.stderr
        )


# -- 3. a test to myself


def test_test_to_sends_the_first_message_to_me_and_records_nothing() -> None:
    with SmtpSink() as sink:
        result = bulkmail(*SEND, *SMTP, "--test-to", "Me <me@example.org>", env=smtp_env(sink.port))
        assert result.exit_code == 0, result.output
        assert "test message sent to me@example.org" in result.stdout
        assert "row 2 (ada.whitfield@example.edu's message)" in result.stdout
        [received] = sink.messages
        assert received.rcpt_tos == ["me@example.org"]
        msg = received.parse()
        assert msg["Subject"] == "[TEST] Reminder: CS101"
        assert msg["To"] == "Me <me@example.org>"
        assert "Dear Ada Whitfield," in msg.get_body().get_content()  # type: ignore[union-attr]
        # row 3 on request; never recorded: no store, no job, no delivery
        third = bulkmail(*SEND, *SMTP, "--test-to", "me@example.org", "--test-row", "3",
                         env=smtp_env(sink.port))  # fmt: skip
        assert third.exit_code == 0, third.output
        assert "Dear Benjamin Okafor," in sink.messages[1].parse().get_body().get_content()  # type: ignore[union-attr]
    assert not default_store().exists()
    assert bulkmail(*SEND, "--test-to", "me@example.org", "--test-row", "99").exit_code == 2
    assert bulkmail(*SEND, "--test-row", "3", "--yes").exit_code == 2


# -- 4. off a terminal: --yes


def test_off_a_terminal_send_and_retry_need_yes_and_resume_does_not(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    refused = bulkmail(*SEND, "--store", store)
    assert refused.exit_code == 2
    assert one_line(refused) == "bulkmail: confirmation required: pass --yes (or --dry-run)"
    assert not Path(store).exists()
    assert bulkmail(*SEND, "--store", store, "--dry-run").exit_code == 0
    assert bulkmail(*SEND, "--store", store, "--yes").exit_code == 0
    retry = bulkmail("retry", "1", "--store", store)
    assert retry.exit_code == 2
    assert one_line(retry) == "bulkmail: confirmation required: pass --yes (or --dry-run)"
    assert bulkmail("retry", "1", "--store", store, "--yes").exit_code == 0
    assert bulkmail("resume", "1", "--store", store).exit_code == 0


# -- 5. names, a cron re-run with nothing new, history


def test_names_are_shown_and_a_rerun_with_nothing_new_creates_no_job(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    cron = [*SEND, "--store", store, "--yes", "--dedupe-key", "autumn"]
    first = bulkmail(*cron, "--new-store", "--name", "Autumn grades", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["name"] == "Autumn grades"
    again = bulkmail(*cron)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == (
        "nothing to send: all 12 recipients already reminded under dedupe key 'autumn'; "
        "no job created"
    )
    assert jobs_in(Path(store)) == 1
    other = bulkmail(*SEND, "--store", store, "--yes", "--only", "ada.whitfield@example.edu")
    assert other.exit_code == 0, other.output
    docs = json.loads(bulkmail("recent", "--json", "--store", store).stdout)
    assert [d["name"] for d in docs] == [
        "Reminder: {{ course }} (instructors.csv)",
        "Autumn grades",
    ]
    table = bulkmail("recent", "--store", store, env={"COLUMNS": "160"}).stdout
    assert "Autumn grades" in table and "Reminder: {{ course }} (instructors.csv)" in table
    status = json.loads(bulkmail("status", "1", "--json", "--store", store).stdout)
    assert status["name"] == "Autumn grades"
    assert "Autumn grades" in bulkmail("status", "1", "--store", store).stdout

    history = bulkmail("history", "ADA.Whitfield@example.edu", "--json", "--store", store)
    assert history.exit_code == 0, history.output
    rows = json.loads(history.stdout)
    assert [(r["job"], r["name"], r["dedupe_key"], r["state"]) for r in rows] == [
        (1, "Autumn grades", "autumn", "sent"),
        (2, "Reminder: {{ course }} (instructors.csv)", None, "sent"),
    ]
    assert all(r["sent_at"] and r["sent_at"].endswith("Z") for r in rows)
    shown = bulkmail("history", "ada.whitfield@example.edu", "--store", store,
                     env={"COLUMNS": "160"}).stdout  # fmt: skip
    assert "Autumn grades" in shown and "autumn" in shown
    none = bulkmail("history", "nobody@example.edu", "--store", store)
    assert none.exit_code == 0 and "no deliveries to nobody@example.edu" in none.stdout
    assert bulkmail(*SEND, "--store", store, "--yes", "--name", "  ").exit_code == 2


def test_a_schema_3_store_gains_job_names(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    assert bulkmail(*SEND, "--store", str(path), "--yes").exit_code == 0
    with sqlite3.connect(path) as conn:  # back to schema 3: no jobs.name
        conn.execute("ALTER TABLE jobs DROP COLUMN name")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store = open_store(str(path))
    try:
        assert store.get_job(1).name is None
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            assert "name" in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
            version = conn.execute(sa.text("SELECT value FROM meta")).scalar()
        engine.dispose()
        assert version == str(SCHEMA_VERSION)  # 3 -> 4 -> every step since
    finally:
        store.close()
    docs = json.loads(bulkmail("recent", "--json", "--store", str(path)).stdout)
    assert docs[0]["name"] == "Reminder: {{ course }}"  # an old job: its subject


# -- 6. messages an office wants


def test_reply_to_cc_bcc_and_headers_reach_the_server() -> None:
    with SmtpSink() as sink:
        result = bulkmail(
            *SEND, *SMTP, "--yes", "--only", "ada.whitfield@example.edu",
            "--reply-to", "Help Desk <help@example.edu>", "--cc", "office@example.edu",
            "--bcc", "archive@example.edu", "--header", "X-Course-Run: autumn 2026",
            env=smtp_env(sink.port, BULKMAIL_CC="dean@example.edu"),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        [received] = sink.messages
    # one copy per message to the office (the flag wins over [defaults] cc / BULKMAIL_CC)
    assert received.rcpt_tos == [
        "ada.whitfield@example.edu",
        "office@example.edu",
        "archive@example.edu",
    ]
    msg = received.parse()
    assert msg["Cc"] == "office@example.edu"
    assert msg["Reply-To"] == "Help Desk <help@example.edu>"
    assert msg["Bcc"] is None and b"archive@" not in received.data
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "OOF, AutoReply"
    assert msg["X-Course-Run"] == "autumn 2026"


def test_config_defaults_give_every_message_its_copies() -> None:
    with SmtpSink() as sink:
        env = smtp_env(sink.port, BULKMAIL_CC="office@example.edu, dean@example.edu",
                       BULKMAIL_REPLY_TO="help@example.edu")  # fmt: skip
        result = bulkmail(*SEND, *SMTP, "--yes", "--only", "ada.whitfield@example.edu", env=env)
        assert result.exit_code == 0, result.output
        [received] = sink.messages
    assert received.rcpt_tos[1:] == ["office@example.edu", "dean@example.edu"]
    msg = received.parse()
    assert msg["Cc"] == "office@example.edu, dean@example.edu"
    assert msg["Reply-To"] == "help@example.edu"


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("To: x@example.edu", "set by bulkmail itself"),
        ("bcc: x@example.edu", "use --bcc"),
        ("Message-ID: <a@b>", "set by bulkmail itself"),
        ("Date: today", "set by bulkmail itself"),
        ("Subject: hi", "set by bulkmail itself"),
        ("Bad Name: x", "not a valid header name"),
        ("X-Injected: a\r\nBcc: evil@example.com", "--header X-Injected: the value"),
        ("no colon", "expected NAME:VALUE"),
    ],
)
def test_unsafe_headers_are_refused(header: str, says: str) -> None:
    result = bulkmail(*SEND, "--yes", "--header", header)
    assert result.exit_code == 2, result.output
    assert says in one_line(result)
    assert not default_store().exists()


def test_both_mime_paths_write_the_office_headers() -> None:
    templates = Templates.load(
        subject="Reminder: {{ course }}",
        text_path=EXAMPLES / "reminder.txt",
        html_path=EXAMPLES / "reminder.html",
        reply_to=["Help <help@example.edu>"],
        cc=["office@example.edu"],
        bcc=["archive@example.edu"],
        headers=["X-Course-Run: autumn"],
    )
    composer = Composer(templates, sender="Course Office <office@example.edu>")
    fields = {"course": "CS101", "course_title": "Intro", "due_date": "2025-09-05"}
    message = composer.build(Recipient(2, "ada@example.edu", "Ada", fields), "<m.1@example.edu>")
    fast, reference = to_bytes_fast(message), to_bytes(message)
    assert (
        fast.split(b"\r\n\r\n")[0].split(b"boundary")[0]
        == (reference.split(b"\r\n\r\n")[0].split(b"boundary")[0])
    )  # the fast path wrote them itself, as EmailMessage does
    for data in (fast, reference):
        msg = message_from_bytes(data, policy=policy.default)
        assert msg["Cc"] == "office@example.edu" and msg["Reply-To"] == "Help <help@example.edu>"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Auto-Response-Suppress"] == "OOF, AutoReply"
        assert msg["X-Course-Run"] == "autumn" and msg["Bcc"] is None
    assert "&lt;" not in str(message.html) and "Intro" in str(message.html)
    # recorded with the job, so a resumed job sends the same
    again = Templates.from_json(templates.subject, json.loads(json.dumps(templates.to_json())))
    assert again == templates


def test_a_header_replaces_a_default_of_the_same_name() -> None:
    templates = Templates.load(
        subject="x", text_path=EXAMPLES / "reminder.txt", headers=["auto-submitted: no"]
    )
    assert templates.headers == (
        ("X-Auto-Response-Suppress", "OOF, AutoReply"),
        ("auto-submitted", "no"),
    )


def test_mailtrap_gets_cc_bcc_and_reply_to_fields() -> None:
    provider = MailtrapProvider(MailtrapSettings(token="t"))
    message = Message(
        "office@example.edu", "Office", "ada@example.edu", "Ada", "s", "t", "<m@example.edu>",
        reply_to=(("Help", "help@example.edu"),), cc=(("", "office@example.edu"),),
        bcc=(("", "archive@example.edu"),), headers=(("Auto-Submitted", "auto-generated"),),
    )  # fmt: skip
    body = provider.request_body(message)
    assert body["cc"] == [{"email": "office@example.edu"}]
    assert body["bcc"] == [{"email": "archive@example.edu"}]
    assert body["reply_to"] == {"email": "help@example.edu", "name": "Help"}
    assert body["headers"]["Auto-Submitted"] == "auto-generated"
    provider.close()
