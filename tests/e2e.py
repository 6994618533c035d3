"""Helpers for the end-to-end tests: run the CLI as a user would (typer's CliRunner on
``bulkmail.cli.app``, the default store under the isolated HOME), build the example course
database with its own script, and check the "refused" contract of a user error (exit 2, one
line on stderr, no traceback, no job, nothing sent)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bulkmail.cli import app
from tests.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SUBJECT = "Reminder: {{ course }} grades due {{ due_date }}"
SENDER = "Course Office <office@example.edu>"
WIDE = {"COLUMNS": "200"}  # Rich tables without wrapped cells, so text can be searched


def readme_join_query() -> str:
    """The instructors JOIN courses query exactly as the README shows it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r'JOIN="(SELECT [^"]*JOIN courses[^"]*)"', text)
    assert found is not None, "the README shows no join query"
    return found.group(1)


def bulkmail(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``bulkmail ARGS`` in-process; an unexpected exception is re-raised (a traceback
    would be a bug)."""
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def data_dir() -> Path:
    return Path(os.environ["XDG_DATA_HOME"]) / "bulkmail"


def default_store() -> Path:
    return data_dir() / "bulkmail.db"


def outbox() -> list[Path]:
    return sorted((data_dir() / "outbox").glob("*.eml"))


def recent_jobs() -> list[dict[str, Any]]:
    if not default_store().exists():
        return []  # no store at all (`recent` on a missing store is exit 2: nothing created)
    result = bulkmail("recent", "--json")
    assert result.exit_code == 0, result.output
    docs: list[dict[str, Any]] = json.loads(result.stdout)
    return docs


def smtp_env(sink: SmtpSink, **extra: str) -> dict[str, str]:
    return {
        "BULKMAIL_SMTP_HOST": sink.host,
        "BULKMAIL_SMTP_PORT": str(sink.port),
        "BULKMAIL_SMTP_SECURITY": "none",
        **extra,
    }


def smtp_args() -> list[str]:
    return ["--provider", "smtp", "--from", SENDER, "--rate", "0"]


def build_course_db(path: str = "course.db") -> Path:
    """``python examples/make_course_db.py course.db``, as the README says."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_course_db.py"), path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "12 instructors, 12 courses" in done.stdout
    return Path(path)


def rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(query))
    finally:
        conn.close()


def assert_refused(result: Any, *fragments: str, sink: SmtpSink | None = None) -> str:
    """Exit 2 with one line on stderr holding every fragment, no traceback, no job created,
    nothing sent (outbox empty, sink empty); returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert recent_jobs() == []
    assert outbox() == []
    if sink is not None:
        assert sink.messages == []
    return str(lines[0])


def process_env(tmp_path: Path, *, port: int, store: str, **extra: str) -> dict[str, str]:
    """The environment of a real `bulkmail` process (worker, cron run) in these tests: its
    own HOME, the given store, SMTP to a sink on loopback."""
    home = tmp_path / "home"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "LANG": "C.UTF-8",
        "BULKMAIL_STORE": store,
        "BULKMAIL_PROVIDER": "smtp",
        "BULKMAIL_FROM": SENDER,
        "BULKMAIL_SMTP_HOST": "127.0.0.1",
        "BULKMAIL_SMTP_PORT": str(port),
        "BULKMAIL_SMTP_SECURITY": "none",
    }
    if "PYTHONPATH" in os.environ:  # a checkout under test (not the installed copy) runs
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(extra)
    return env


def write_recipients(tmp_path: Path, n: int, name: str = "list.csv") -> tuple[Path, list[str]]:
    """A CSV of ``n`` instructors and a one-line template ``t.txt`` beside it."""
    emails = [f"instructor{i:04d}@example.edu" for i in range(n)]
    csv = tmp_path / name
    csv.write_text("name,email\n" + "".join(f"Instructor {i},{e}\n" for i, e in enumerate(emails)))
    (tmp_path / "t.txt").write_text("Dear {{ name }}, grades are due.")
    return csv, emails
