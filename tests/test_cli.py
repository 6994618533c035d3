"""The command line end to end: real CSV/template files, a real SQLite store, a real SMTP
server on loopback, and the installed `bulkmail` script in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bulkmail.cli import app
from tests.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SUBJECT = "Reminder: {{ course }} grades due {{ due_date }}"


def bulkmail(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def job_count(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


def smtp_env(sink: SmtpSink) -> dict[str, str]:
    return {
        "BULKMAIL_SMTP_HOST": sink.host,
        "BULKMAIL_SMTP_PORT": str(sink.port),
        "BULKMAIL_SMTP_SECURITY": "none",
    }


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    [line] = [ln for ln in block.splitlines() if ln.startswith("pip install")]
    return line


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The README's quickstart job, exactly as written (after its `pip install -e .`),
    through the installed script, on a fresh HOME: the outbox default must just work."""
    install, _, command = readme_block("quickstart").partition(" && ")
    assert install == "pip install -e ."
    script = shutil.which("bulkmail") or str(Path(sys.executable).parent / "bulkmail")
    home = tmp_path / "fresh-home"
    env = {
        "PATH": f"{Path(script).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout
    outbox = home / ".local" / "share" / "bulkmail" / "outbox"
    emls = sorted(outbox.glob("*.eml"))
    assert len(emls) == 12
    store = home / ".local" / "share" / "bulkmail" / "bulkmail.db"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    status = subprocess.run(
        ["bulkmail", "status", "1", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    doc = json.loads(status.stdout)
    assert (doc["state"], doc["sent"], doc["total"]) == ("completed", 12, 12)
    recent = subprocess.run(
        ["bulkmail", "recent"], env=env, capture_output=True, text=True, timeout=30
    )
    assert recent.returncode == 0 and "completed" in recent.stdout


def test_readme_test_command_is_what_ci_runs() -> None:
    assert readme_block("test-command").startswith("pip install -e '.[test]' && pytest")
    assert "test-command" in (REPO / ".ci" / "run").read_text()


def test_send_through_real_smtp_server(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    store = tmp_path / "jobs.db"
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        str(EXAMPLES / "instructors.csv"),
        "--template",
        str(EXAMPLES / "reminder.txt"),
        "--subject",
        SUBJECT,
        "--provider",
        "smtp",
        "--from",
        "Course Office <office@example.edu>",
        "--rate",
        "0",
        "--store",
        str(store),
        "--json",
        env=smtp_env(smtp_sink),
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"], doc["failed"], doc["total"]) == ("completed", 12, 0, 12)
    for key in (
        "id",
        "provider",
        "subject",
        "skipped",
        "pending",
        "cancelled",
        "created_at",
        "started_at",
        "finished_at",
        "rate",
        "burst",
        "dedupe_key",
        "in_doubt",
        "worker_pid",
        "heartbeat_at",
        "log_path",
    ):
        assert key in doc
    messages = [m.parse() for m in smtp_sink.messages]
    assert len(messages) == 12
    by_to = {m["To"].addresses[0].addr_spec: m for m in messages}
    zoe = by_to["zoe.angstrom@example.edu"]
    assert zoe["To"].addresses[0].display_name == "Zoë Ångström"
    assert zoe["Subject"] == "Reminder: PHYS210 grades due 2025-09-08"
    assert "Dear Zoë Ångström," in zoe.get_content()
    assert zoe["From"].addresses[0].addr_spec == "office@example.edu"
    assert zoe["Date"].datetime.tzinfo is not None  # RFC 5322 requires a Date
    assert len({m["Message-ID"] for m in messages}) == 12
    assert all(m.rcpt_tos == [m.parse()["To"].addresses[0].addr_spec] for m in smtp_sink.messages)


def test_rate_limit_at_the_server(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    """20/s, burst 1, for 12 messages: the server sees them spread over >= 0.55 s and
    never more than rate*t + burst in any window (loose bounds: a real clock)."""
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        str(EXAMPLES / "instructors.csv"),
        "--template",
        str(EXAMPLES / "reminder.txt"),
        "--subject",
        SUBJECT,
        "--provider",
        "smtp",
        "--from",
        "office@example.edu",
        "--rate",
        "20",
        "--burst",
        "1",
        "--store",
        str(tmp_path / "jobs.db"),
        env=smtp_env(smtp_sink),
    )
    assert result.exit_code == 0, result.output
    times = sorted(m.received_at for m in smtp_sink.messages)
    assert len(times) == 12
    assert times[-1] - times[0] >= 11 / 20 * 0.9
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t - start < 0.25]
        assert len(in_window) <= 20 * 0.25 + 1 + 1  # one extra for scheduling jitter


def write(name: str, text: str | bytes) -> Path:
    path = Path(name)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


BAD_INPUTS = {
    "missing csv": (None, "missing.csv: no such file"),
    "no email column": ("name,course\nAda,CS101\n", "list.csv: no 'email' column"),
    "not utf-8": (
        b"name,email,course\nJos\xe9,jose@example.edu,CS1\n",
        "list.csv: row 2: not valid UTF-8",
    ),
    "no data rows": ("name,email,course\n", "list.csv: no data rows"),
    "missing variable": (
        "name,email,course\nAda,ada@example.edu,CS101\nBen,ben@example.edu,\n",
        "list.csv: template uses 'due_date'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_creates_no_job(case: str, tmp_path: Path) -> None:
    content, expected = BAD_INPUTS[case]
    csv_name = "missing.csv" if content is None else "list.csv"
    if content is not None:
        write(csv_name, content)
    write("t.txt", "Hi {{ name }}, {{ course }} is due {{ due_date }}.")
    store = tmp_path / "jobs.db"
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        csv_name,
        "--template",
        "t.txt",
        "--subject",
        "x",
        "--store",
        str(store),
        "--yes",
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert job_count(store) == 0
    assert not list(Path().glob("**/*.eml"))


def test_missing_variable_in_one_row_names_the_row(tmp_path: Path) -> None:
    write("list.csv", "name,email,course\nAda,ada@example.edu,CS101\n")
    write("t.txt", "Hi {{ name }}, {% if course == 'CS101' %}{{ room }}{% endif %}")
    store = tmp_path / "jobs.db"
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        "t.txt",
        "--subject",
        "x",
        "--store",
        str(store),
    )
    assert result.exit_code == 2
    assert "room" in result.stderr
    assert job_count(store) == 0


def test_missing_template(tmp_path: Path) -> None:
    write("list.csv", "name,email\nAda,ada@example.edu\n")
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        "nope.txt",
        "--subject",
        "x",
        "--store",
        str(tmp_path / "s.db"),
    )
    assert result.exit_code == 2
    assert "nope.txt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert job_count(tmp_path / "s.db") == 0


def test_status_of_unknown_job(tmp_path: Path) -> None:
    from bulkmail.store import open_store

    open_store(tmp_path / "s.db").close()  # a store with no job 7 (a missing store: exit 2 too)
    result = bulkmail("status", "7", "--store", str(tmp_path / "s.db"))
    assert result.exit_code == 2
    assert result.stderr.strip() == "bulkmail: no job 7 in the store (see `bulkmail recent`)"


def test_smtp_without_sender_is_a_clear_error(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    write("list.csv", "name,email\nAda,ada@example.edu\n")
    write("t.txt", "Hi")
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        "t.txt",
        "--subject",
        "x",
        "--provider",
        "smtp",
        "--store",
        str(tmp_path / "s.db"),
        env=smtp_env(smtp_sink),
    )
    assert result.exit_code == 2
    assert "--from" in result.stderr and "BULKMAIL_FROM" in result.stderr
    assert smtp_sink.messages == []


def test_recent_and_status_views(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    for subject in ("First {{ course }}", "Second"):
        r = bulkmail(
            "send-reminders",
            "--yes",
            "--csv",
            str(EXAMPLES / "instructors.csv"),
            "--template",
            str(EXAMPLES / "reminder.txt"),
            "--subject",
            subject,
            "--store",
            store,
        )
        assert r.exit_code == 0, r.output
    recent = bulkmail("recent", "--json", "--store", store)
    docs = json.loads(recent.stdout)
    assert [d["id"] for d in docs] == [2, 1]
    assert [d["subject"] for d in docs] == ["Second", "First {{ course }}"]
    table = bulkmail("recent", "--limit", "1", "--store", store)
    assert table.exit_code == 0 and "Second" in table.stdout and "First" not in table.stdout
    panel = bulkmail("status", "1", "--store", store)
    assert panel.exit_code == 0
    assert re.search(r"12 sent", panel.stdout) and "completed" in panel.stdout


def test_dry_run_sends_nothing_and_creates_nothing(tmp_path: Path) -> None:
    write("list.csv", "name,email,course\nAda,ada@example.edu,CS1\nBad,not-an-address,CS2\n")
    write("t.txt", "Hi {{ name }} {{ course }}")
    store = tmp_path / "s.db"
    result = bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        "t.txt",
        "--subject",
        "x",
        "--dry-run",
        "--json",
        "--store",
        str(store),
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pending"] == 1
    assert doc["skips"][0]["row"] == 3 and "invalid address" in doc["skips"][0]["reason"]
    assert job_count(store) == 0


def registered_commands() -> list[str]:
    """The commands the app registers, as Click sees them (hidden ones too)."""
    from typer.core import TyperGroup
    from typer.main import get_command

    group = get_command(app)
    assert isinstance(group, TyperGroup)
    return sorted(group.commands)


def test_help_of_every_command_has_an_example() -> None:
    commands = registered_commands()
    assert set(commands) >= {
        "send-reminders",
        "status",
        "recent",
        "resume",
        "cancel",
        "retry",
        "preview",
        "report",
        "worker",
    }
    for name in commands:
        result = bulkmail(name, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout and "bulkmail" in result.stdout, name


def test_the_readme_command_table_lists_every_command() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z-]+)[ `]", table, re.MULTILINE))
    assert listed == set(registered_commands())


def test_failed_deliveries_listed_then_retried(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    smtp_sink.replies["chen.wei@example.edu"] = "550 5.1.1 mailbox unavailable"
    args = ["--template", str(EXAMPLES / "reminder.txt"), "--subject", SUBJECT]
    first = bulkmail(
        "send-reminders", "--yes", "--csv", str(EXAMPLES / "instructors.csv"), *args,
        "--provider", "smtp", "--from", "office@example.edu", "--rate", "0", "--store", store,
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert first.exit_code == 1, first.output
    assert "bulkmail retry 1" in first.stdout
    failed = bulkmail("status", "1", "--failed", "--json", "--store", store)
    doc = json.loads(failed.stdout)
    assert doc["failures"] == [
        {
            "email": "chen.wei@example.edu",
            "name": "Chen Wei",
            "attempts": 1,
            "error": "550 5.1.1 mailbox unavailable",
        }
    ]
    table = bulkmail("status", "1", "--failed", "--store", store)
    assert "chen.wei@example.edu" in table.stdout and "550 5.1.1" in table.stdout
    del smtp_sink.replies["chen.wei@example.edu"]
    retried = bulkmail("retry", "1", "--yes", "--json", "--store", store, env=smtp_env(smtp_sink))
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout)["sent"] == 12
    assert [m.rcpt_tos[0] for m in smtp_sink.messages].count("chen.wei@example.edu") == 1
    assert len(smtp_sink.messages) == 12


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--rate", "nan"], {}, "--rate: must be 0 (unlimited) or a positive number"),
        (["--rate", "-1"], {}, "--rate: must be 0 (unlimited) or a positive number"),
        (["--backoff", "inf"], {}, "--backoff: must be a number of seconds"),
        ([], {"BULKMAIL_RATE": "-5"}, "rate (BULKMAIL_RATE or the config file): must be 0"),
        ([], {"BULKMAIL_RATE": "abc"}, "BULKMAIL_RATE: expected a number, got 'abc'"),
        (
            [],
            {"BULKMAIL_BURST": "0"},
            "burst (BULKMAIL_BURST or the config file): must be at least 1",
        ),
        (["--provider", "mailtrap"], {}, "the mailtrap provider needs a token"),
        (["--provider", "smtp"], {"BULKMAIL_SMTP_PORT": "99999"}, "SMTP port 99999 is not"),
    ],
)
def test_bad_settings_are_refused_before_a_job_exists(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    store = tmp_path / "s.db"
    result = bulkmail(
        "send-reminders", "--yes", "--csv", str(EXAMPLES / "instructors.csv"),
        "--template", str(EXAMPLES / "reminder.txt"), "--subject", SUBJECT,
        "--from", "office@example.edu", "--store", str(store), *args,
        env=env,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert job_count(store) == 0


def test_a_list_with_no_valid_recipient_creates_no_job(tmp_path: Path) -> None:
    write("bad.csv", "name,email\nAda,not-an-address\nBen,also bad\n")
    write("t.txt", "Hi {{ name }}")
    store = tmp_path / "s.db"
    result = bulkmail("send-reminders", "--yes", "--csv", "bad.csv", "--template", "t.txt",
                      "--subject", "x", "--store", str(store))  # fmt: skip
    assert result.exit_code == 2
    assert "bad.csv: no valid recipient: all 2 rows are skipped (row 2: invalid address" in (
        result.stderr
    )
    assert job_count(store) == 0
    dry = bulkmail("send-reminders", "--yes", "--csv", "bad.csv", "--template", "t.txt",
                   "--subject", "x", "--store", str(store), "--dry-run")  # fmt: skip
    assert dry.exit_code == 2 and "not-an-address" in dry.stdout


def test_a_course_database_is_never_used_as_a_job_store(tmp_path: Path) -> None:
    import subprocess as sp

    sp.run([sys.executable, str(EXAMPLES / "make_course_db.py"), "course.db"], check=True)
    before = Path("course.db").read_bytes()
    result = bulkmail("recent", "--store", "course.db")
    assert result.exit_code == 2
    assert "not a bulkmail job store" in result.stderr
    assert Path("course.db").read_bytes() == before


def test_dry_run_shows_the_skips_of_the_dedupe_key(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    args = ["send-reminders", "--yes", "--csv", str(EXAMPLES / "instructors.csv"),
            "--template", str(EXAMPLES / "reminder.txt"), "--subject", SUBJECT,
            "--store", store, "--dedupe-key", "autumn"]  # fmt: skip
    assert bulkmail(*args, "--only", "chen.wei@example.edu", "--new-store").exit_code == 0
    dry = bulkmail(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    doc = json.loads(dry.stdout)
    assert doc["pending"] == 11
    assert [s["reason"] for s in doc["skips"]] == ["already sent under dedupe key 'autumn' (job 1)"]


def test_cancel_and_status_use_the_store_of_the_config_file(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    write("bulkmail.toml", f'[defaults]\nstore = "{other}"\n')
    sent = bulkmail("send-reminders", "--yes", "--csv", str(EXAMPLES / "instructors.csv"),
                    "--template", str(EXAMPLES / "reminder.txt"), "--subject", "x",
                    "--config", "bulkmail.toml")  # fmt: skip
    assert sent.exit_code == 0, sent.output
    assert job_count(other) == 1
    assert bulkmail("status", "1", "--config", "bulkmail.toml").exit_code == 0
    cancel = bulkmail("cancel", "1", "--config", "bulkmail.toml")
    assert cancel.exit_code == 2 and "job 1 is already completed" in cancel.stderr
    again = bulkmail("retry", "1", "--yes", "--config", "bulkmail.toml")
    assert again.exit_code == 0 and "nothing to retry" in again.stdout
