"""The course database, preview, dry run, --only/--exclude and report, end to end through
the command line: the example database built by its own script, the README's join query,
the default store and outbox under the isolated HOME, a real SMTP server on loopback."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (
    EXAMPLES,
    SENDER,
    SUBJECT,
    WIDE,
    assert_refused,
    build_course_db,
    bulkmail,
    default_store,
    outbox,
    readme_join_query,
    recent_jobs,
    rows,
    smtp_args,
    smtp_env,
)
from tests.smtp_sink import SmtpSink

REMINDER = str(EXAMPLES / "reminder.txt")


def parse_eml(path: Path) -> EmailMessage:
    """An .eml file of the outbox (CRLF, as on the wire) as a mail client reads it."""
    data = path.read_bytes().replace(b"\r\n", b"\n")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def only_to(message: EmailMessage) -> str:
    [address] = message["To"].addresses
    return str(address.addr_spec)


# --------------------------------------------------------------------------- course database


def test_default_query_sends_every_instructor_into_the_outbox() -> None:
    db = build_course_db()
    before = db.read_bytes()
    Path("t.txt").write_text("Dear {{ name }},\nplease submit your grades.\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///course.db", "--template", "t.txt",
        "--subject", "Grades, {{ name }}", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["provider"], doc["sent"], doc["total"]) == (
        "completed",
        "outbox",
        12,
        12,
    )
    assert doc["source"] == "sqlite:///course.db"
    instructors = dict(rows(db, "SELECT email, name FROM instructors"))
    messages = [parse_eml(p) for p in outbox()]
    assert {only_to(m): m["To"].addresses[0].display_name for m in messages} == instructors
    zoe = next(m for m in messages if only_to(m) == "zoe.angstrom@example.edu")
    assert zoe["Subject"] == "Grades, Zoë Ångström"
    assert zoe.get_content() == "Dear Zoë Ångström,\nplease submit your grades.\n"
    assert db.read_bytes() == before, "the course database must never be written"


def test_readme_join_query_columns_are_template_variables(smtp_sink: SmtpSink) -> None:
    db = build_course_db()
    query = readme_join_query()
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///course.db", "--query", query,
        "--template", REMINDER, "--subject", SUBJECT, *smtp_args(), "--json",
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 12
    expected = {
        email_: (name, f"Reminder: {code} grades due {starts}")
        for name, email_, code, starts in rows(
            db,
            "SELECT i.name, i.email, c.code, c.starts_on"
            " FROM instructors i JOIN courses c ON c.instructor_id = i.id",
        )
    }
    received = {}
    for m in smtp_sink.messages:
        parsed = m.parse()
        assert m.rcpt_tos == [only_to(parsed)]
        received[only_to(parsed)] = (parsed["To"].addresses[0].display_name, parsed["Subject"])
        code = parsed["Subject"].split()[1]
        assert f"the final grades for {code} are due on" in parsed.get_content()
    assert received == expected


def test_query_without_an_email_column_is_refused() -> None:
    build_course_db()
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///course.db", "--query",
        "SELECT name, id FROM instructors", "--template", REMINDER, "--subject", "x", "--yes",
    )  # fmt: skip
    assert_refused(result, "sqlite:///course.db: no 'email' column (found: name, id)", "AS email")


WRITES = [
    "DELETE FROM instructors",
    "UPDATE instructors SET email = 'thief@evil.example'",
    "SELECT 1; DROP TABLE instructors",
    "SELECT name, email FROM instructors; DELETE FROM instructors",
    "SELECT name, email FROM instructors -- harmless?\n; DROP TABLE courses",
    "INSERT INTO instructors VALUES (99, 'Eve', 'eve@evil.example')",
    "ATTACH DATABASE 'stolen.db' AS stolen",
    "PRAGMA writable_schema = ON",
    # one statement that starts with WITH yet writes: refused by the read-only transaction
    "WITH x AS (SELECT 1) DELETE FROM instructors",
    "WITH x AS (SELECT 1) UPDATE instructors SET email = 'thief@evil.example'",
]


@pytest.mark.parametrize("query", WRITES)
def test_a_query_that_writes_is_refused_and_changes_nothing(query: str) -> None:
    db = build_course_db()
    before = db.read_bytes()
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///course.db", "--query", query,
        "--template", REMINDER, "--subject", "x", "--yes",
    )  # fmt: skip
    line = assert_refused(result)
    assert line.startswith(("bulkmail: --query: only a single SELECT", "bulkmail: sqlite:///"))
    assert rows(db, "SELECT count(*) FROM instructors") == [(12,)]
    assert rows(db, "SELECT count(*) FROM courses") == [(12,)]
    assert rows(db, "SELECT count(*) FROM instructors WHERE email LIKE '%evil%'") == [(0,)]
    assert db.read_bytes() == before
    assert not Path("stolen.db").exists()


# --------------------------------------------------------------------------- preview, dry run


def test_preview_shows_two_messages_and_creates_nothing(smtp_sink: SmtpSink) -> None:
    build_course_db()
    result = bulkmail(
        "preview", "--db", "sqlite:///course.db", "--query", readme_join_query(),
        "--template", REMINDER, "--subject", SUBJECT, "--count", "2", *smtp_args()[:4],
        env={**WIDE, **smtp_env(smtp_sink)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "message 1" in out and "message 2" in out and "message 3" not in out
    assert out.count("From:") == 2 and out.count("To:") == 2 and out.count("Subject:") == 2
    assert SENDER in out
    assert "Ada Whitfield <ada.whitfield@example.edu>" in out
    assert "Reminder: CS101 grades due 2025-09-05" in out
    assert "Benjamin Okafor <b.okafor@example.edu>" in out
    assert "Dear Benjamin Okafor," in out and "the final grades for CS220" in out
    assert "Zoë" not in out
    assert smtp_sink.messages == [] and smtp_sink.connections == 0
    assert not default_store().exists(), "preview must not even create the job store"
    assert outbox() == []
    assert recent_jobs() == []


def write_list() -> Path:
    path = Path("list.csv")
    path.write_text(
        "name,email,course,due_date\n"
        "Ada,ada@example.edu,CS101,Monday\n"
        "Ben,ben@example.edu,CS102,Monday\n"
        "Bad,not-an-address,CS103,Monday\n"
        "Ada again,ADA@Example.EDU,CS104,Monday\n"
        "Cleo,cleo@example.edu,CS105,Tuesday\n"
        "Dan,dan@example.edu,CS106,Tuesday\n",
        encoding="utf-8",
    )
    return path


def test_dry_run_lists_skips_and_estimates_the_duration(smtp_sink: SmtpSink) -> None:
    write_list()
    args = [
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        REMINDER,
        "--subject",
        SUBJECT,
    ]
    args += ["--provider", "smtp", "--from", SENDER, "--rate", "0.05", "--dry-run"]
    text = bulkmail(*args, env={**WIDE, **smtp_env(smtp_sink)})
    assert text.exit_code == 0, text.output
    out = text.stdout
    assert "4 to send, 2 skipped" in out
    assert "0.05/s (one every 20 s), burst 1: about 60 s" in out  # (4 - burst) / 0.05
    assert "not-an-address" in out and "invalid address" in out
    assert "ADA@example.edu" in out and "duplicate of row 2" in out  # domain normalised
    assert "nothing was sent and no job was created" in out

    as_json = bulkmail(*args, "--json", env=smtp_env(smtp_sink))
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    assert doc["dry_run"] is True and doc["pending"] == 4 and doc["provider"] == "smtp"
    assert doc["estimated_seconds"] == 60.0 and doc["rate"] == 0.05
    assert [(s["row"], s["email"]) for s in doc["skips"]] == [
        (4, "not-an-address"),
        (5, "ADA@example.edu"),
    ]
    assert doc["skips"][0]["reason"].startswith("invalid address: ")
    assert doc["skips"][1]["reason"] == "duplicate of row 2"
    assert smtp_sink.messages == [] and smtp_sink.connections == 0
    assert not default_store().exists(), "a dry run must not even create the job store"
    assert recent_jobs() == []


# --------------------------------------------------------------------------- --only / --exclude


def sent_to(result: object) -> set[str]:
    return {only_to(parse_eml(p)) for p in outbox()}


def test_only_and_exclude_are_repeatable_and_case_insensitive() -> None:
    build_course_db()
    base = ["send-reminders", "--yes", "--db", "sqlite:///course.db", "--template", REMINDER]
    base += ["--query", readme_join_query(), "--subject", SUBJECT, "--json"]
    only = bulkmail(*base, "--only", "ADA.WHITFIELD@example.edu", "--only", "b.okafor@EXAMPLE.EDU")
    assert only.exit_code == 0, only.output
    doc = json.loads(only.stdout)
    assert (doc["total"], doc["sent"]) == (2, 2)
    assert sent_to(only) == {"ada.whitfield@example.edu", "b.okafor@example.edu"}

    for eml in outbox():
        eml.unlink()
    exclude = bulkmail(
        *base, "--exclude", "Zoe.Angstrom@Example.Edu", "--exclude", " chen.wei@example.edu "
    )
    assert exclude.exit_code == 0, exclude.output
    assert json.loads(exclude.stdout)["sent"] == 10
    assert not {"zoe.angstrom@example.edu", "chen.wei@example.edu"} & sent_to(exclude)

    for eml in outbox():
        eml.unlink()
    both = bulkmail(
        *base, "--only", "chen.wei@example.edu", "--only", "m.dubois@example.org",
        "--exclude", "CHEN.WEI@example.edu",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    assert sent_to(both) == {"m.dubois@example.org"}
    assert len(recent_jobs()) == 3


def test_only_with_an_address_not_in_the_list_is_refused() -> None:
    build_course_db()
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///course.db", "--template", REMINDER,
        "--query", readme_join_query(), "--subject", SUBJECT, "--yes",
        "--only", "ada.whitfield@example.edu", "--only", "typo@x",
    )  # fmt: skip
    assert_refused(result, "--only typo@x: not in the recipients")


# --------------------------------------------------------------------------- report


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_report_has_one_row_per_delivery(smtp_sink: SmtpSink) -> None:
    write_list()
    smtp_sink.replies["dan@example.edu"] = "550 5.1.1 mailbox unavailable"
    sent = bulkmail(
        "send-reminders", "--csv", "list.csv", "--template", REMINDER, "--subject", SUBJECT,
        "--yes", *smtp_args(), env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert sent.exit_code == 1, sent.output  # one failed delivery

    result = bulkmail("report", "1", "--output", "out.csv")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "bulkmail: wrote 6 rows to out.csv"
    text = Path("out.csv").read_text(encoding="utf-8")
    report = read_csv(text)
    assert [(r["row"], r["email"], r["name"], r["state"]) for r in report] == [
        ("2", "ada@example.edu", "Ada", "sent"),
        ("3", "ben@example.edu", "Ben", "sent"),
        ("4", "not-an-address", "Bad", "skipped"),
        ("5", "ADA@example.edu", "Ada again", "skipped"),
        ("6", "cleo@example.edu", "Cleo", "sent"),
        ("7", "dan@example.edu", "Dan", "failed"),
    ]
    by_email = {r["email"]: r for r in report}
    ada, bad, dan = (
        by_email["ada@example.edu"],
        by_email["not-an-address"],
        by_email["dan@example.edu"],
    )
    assert ada["attempts"] == "1" and ada["error"] == ""
    assert ada["sent_at"].endswith("Z") and ada["sent_at"][:2] == "20"
    received = {m.rcpt_tos[0]: m.parse()["Message-ID"] for m in smtp_sink.messages}
    assert ada["message_id"] == received["ada@example.edu"]
    assert bad["error"].startswith("invalid address: ") and bad["sent_at"] == ""
    assert by_email["ADA@example.edu"]["error"] == "duplicate of row 2"
    assert dan["error"] == "550 5.1.1 mailbox unavailable" and dan["attempts"] == "1"
    assert dan["sent_at"] == ""

    stdout = bulkmail("report", "1")
    assert stdout.exit_code == 0 and stdout.stdout == text

    status = bulkmail("status", "1", "--skipped", env=WIDE)
    assert status.exit_code == 0, status.output
    assert "2 skipped deliveries" in status.stdout
    assert "not-an-address" in status.stdout and "duplicate of row 2" in status.stdout
    skips = json.loads(bulkmail("status", "1", "--skipped", "--json").stdout)["skips"]
    assert [(s["row"], s["email"]) for s in skips] == [
        (4, "not-an-address"),
        (5, "ADA@example.edu"),
    ]


def test_report_errors_are_one_line() -> None:
    from bulkmail.store import open_store

    open_store(default_store()).close()  # a store without job 7 (no store at all: exit 2 too)
    unknown = bulkmail("report", "7", "--output", "out.csv")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == "bulkmail: no job 7 in the store (see `bulkmail recent`)"
    assert not Path("out.csv").exists(), "no empty report for a job that does not exist"
    assert bulkmail("report", "7").exit_code == 2

    write_list()
    done = bulkmail(
        "send-reminders", "--yes", "--csv", "list.csv", "--template", REMINDER, "--subject", SUBJECT
    )
    assert done.exit_code == 0, done.output
    for target, problem in (
        ("no/such/dir/out.csv", "No such file or directory"),
        (".", "Is a directory"),
    ):
        result = bulkmail("report", "1", "--output", target)
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and target in lines[0] and problem in lines[0], result.stderr
        assert "Traceback" not in result.output


# --------------------------------------------------------------------------- the query, once


@pytest.fixture
def query_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement run on a SQLite connection opened from now on (a trace callback on
    the real connections): the course database's and the job store's."""
    import sqlite3

    statements: list[str] = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    return statements


@pytest.mark.parametrize(
    "command",
    [
        ["send-reminders", "--dry-run"],
        ["send-reminders", "--yes"],
        ["send-reminders", "--yes", "--only", "zoe.angstrom@example.edu"],
        ["preview", "--count", "2"],
    ],
)
def test_the_query_runs_once_per_command(query_runs: list[str], command: list[str]) -> None:
    build_course_db()
    query = readme_join_query()
    result = bulkmail(
        *command, "--db", "sqlite:///course.db", "--query", query,
        "--template", REMINDER, "--subject", SUBJECT,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [s for s in query_runs if "JOIN courses" in s] == [query]


# --------------------------------------------------------------------------- multi-line fields


def write_notes_list() -> Path:
    path = Path("notes.csv")
    rows = [
        ["name", "email", "course", "notes"],
        ["Ada", "ada@example.edu", "CS101", "Room 4B.\r\nBring the signed forms.\nThanks!"],
        ["Ben", "ben@example.edu", "CS102\nBcc: victim@example.org", "fine"],
        ["Eve\r\nBcc: victim@example.org", "eve@example.org", "CS103", "fine"],
        ["Mal", "mal@example.org\nBcc: victim@example.org", "CS104", "fine"],
        ["Cleo", "cleo@example.edu", "CS105", "one line\x00NUL"],
        ["Dan", "dan@example.edu", "CS106", "Line one\rline two (old Mac)"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


def test_line_breaks_are_kept_in_a_body_only_column_and_refused_in_headers(
    smtp_sink: SmtpSink,
) -> None:
    write_notes_list()
    Path("t.txt").write_text("Dear {{ name }},\n{{ notes }}\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--yes", "--csv", "notes.csv", "--template", "t.txt",
        "--subject", "Reminder: {{ course }}", *smtp_args(), "--json",
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 2
    received = {m.rcpt_tos[0]: m for m in smtp_sink.messages}
    assert set(received) == {"ada@example.edu", "dan@example.edu"}
    assert b"\nBcc" not in b"".join(m.data for m in smtp_sink.messages)
    ada = received["ada@example.edu"].parse()
    assert ada["Subject"] == "Reminder: CS101"
    assert ada.get_content() == "Dear Ada,\nRoom 4B.\nBring the signed forms.\nThanks!\n"
    dan = received["dan@example.edu"].parse()
    assert dan.get_content() == "Dear Dan,\nLine one\nline two (old Mac)\n"
    skips = json.loads(bulkmail("status", "1", "--skipped", "--json").stdout)["skips"]
    assert [(s["email"], s["reason"]) for s in skips] == [
        ("ben@example.edu", "column 'course' contains a line feed (LF)"),
        ("eve@example.org", "column 'name' contains a carriage return (CR)"),
        ("mal@example.org\nBcc: victim@example.org", "column 'email' contains a line feed (LF)"),
        ("cleo@example.edu", "column 'notes' contains a NUL character"),
    ]


def test_a_column_used_in_the_subject_or_an_attachment_name_is_a_header_column() -> None:
    write_notes_list()
    Path("files").mkdir()
    for code in ("CS101", "CS105", "CS106"):
        Path("files", f"{code}.txt").write_text("sheet", encoding="utf-8")
    Path("t.txt").write_text("Dear {{ name }}\n", encoding="utf-8")
    base = ["send-reminders", "--csv", "notes.csv", "--template", "t.txt", "--dry-run", "--json"]
    in_subject = bulkmail(*base, "--subject", "About {{ notes }}")
    assert in_subject.exit_code == 0, in_subject.output
    reasons = {s["email"]: s["reason"] for s in json.loads(in_subject.stdout)["skips"]}
    assert reasons["ada@example.edu"] == "column 'notes' contains a carriage return (CR)"
    assert reasons["dan@example.edu"] == "column 'notes' contains a carriage return (CR)"
    in_attachment = bulkmail(*base, "--subject", "Hi", "--attach", "files/{{ course }}.txt")
    assert in_attachment.exit_code == 0, in_attachment.output
    doc = json.loads(in_attachment.stdout)
    reasons = {s["email"]: s["reason"] for s in doc["skips"]}
    assert reasons["ben@example.edu"] == "column 'course' contains a line feed (LF)"
    assert "ada@example.edu" not in reasons and doc["pending"] == 2


def test_a_postgresql_role_that_can_write_is_named_on_stderr(pg_url: str) -> None:
    from sqlalchemy import make_url

    from tests.test_sources import course_tables

    course_tables(pg_url)
    role = make_url(pg_url).username
    Path("t.txt").write_text("Dear {{ name }}\n", encoding="utf-8")
    args = ["--db", pg_url, "--template", "t.txt", "--subject", "Hi"]
    for command in (["preview", "--count", "1"], ["send-reminders", "--dry-run", "--json"]):
        result = bulkmail(*command, *args)
        assert result.exit_code == 0, result.output
        [line] = result.stderr.splitlines()
        assert line.startswith("bulkmail: warning: postgresql+psycopg://")
        assert f"the role '{role}' can write to instructors (which the query reads)" in line
