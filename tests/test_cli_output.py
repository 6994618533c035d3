"""Help and output (issue 14): -h everywhere, completion, defaults and environment variables
in --help, examples on their own lines, JOB_ID as typed, TERM=dumb, no wrapping off a
terminal, one `bulkmail:` prefix on stderr, UTC in the worker log, --json for cancel and
report, and the same JSON keys in the dry run as in status."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bulkmail.cli import app
from bulkmail.cli.common import setup_logging, utc_now
from bulkmail.cli.env import Environment, use
from tests.test_cli import EXAMPLES, bulkmail, registered_commands

SEND = [
    "send-reminders",
    "--csv",
    str(EXAMPLES / "instructors.csv"),
    "--template",
    str(EXAMPLES / "reminder.txt"),
    "--subject",
    "Reminder: {{ course }}",
    "--yes",  # off a terminal nothing is sent without it
]
LONG = "ada.lovelace.the.countess.of.lovelace@analytical-engine.example.edu"


def test_dash_h_works_everywhere() -> None:
    root = bulkmail("-h")
    assert root.exit_code == 0 and "Usage:" in root.stdout and "-h, --help" in root.stdout
    for name in registered_commands():
        result = bulkmail(name, "-h")
        assert result.exit_code == 0, name
        assert "Usage:" in result.stdout and "-h, --help" in result.stdout, name


def test_shell_completion_is_offered() -> None:
    root = bulkmail("--help")
    assert "--install-completion" in root.stdout and "--show-completion" in root.stdout
    # as a user asks for it: from bash, which typer finds among the process's ancestors (in
    # process, under a pytest worker, it may find no shell: "Shell not supported")
    code = "import sys; from bulkmail.cli import main; sys.argv[0] = 'bulkmail'; main()"
    line = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} --show-completion; exit $?"
    shown = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "_BULKMAIL_COMPLETE" in shown.stdout and "complete " in shown.stdout


def test_job_id_is_shown_as_typed() -> None:
    for name in ("status", "resume", "cancel", "retry", "report", "worker"):
        text = bulkmail(name, "--help").stdout
        assert f"{name} [OPTIONS] JOB_ID" in text, name
        assert "{JOB_ID}" not in text and "<int" not in text and "x>=1" not in text, name


def test_options_with_an_environment_variable_show_it() -> None:
    text = " ".join(bulkmail("send-reminders", "--help").stdout.split())
    for var in ("BULKMAIL_STORE", "BULKMAIL_CONFIG", "BULKMAIL_FROM", "BULKMAIL_PER_HOUR"):
        assert f"env var: {var}" in text, var
    assert "[default: 3]" in text  # --max-retries


def test_examples_stand_on_their_own_lines_and_paste(tmp_path: Path) -> None:
    """Even in a narrow terminal an example is not rewrapped: each is a command line (with
    `\\` continuations), so a copy is a valid shell command."""
    for name in registered_commands():
        text = bulkmail(name, "--help", env={"COLUMNS": "40"}).stdout
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.strip().startswith("bulkmail ")]
        assert starts, (name, text)
        first = lines[starts[0]]
        assert first.strip().startswith(f"bulkmail {name}"), (name, first)
        command = first.strip()
        i = starts[0]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + lines[i].strip()
        assert "\\" not in command and command.count("bulkmail ") == 1, command


def _plain(*, terminal: bool, term: str = "xterm") -> Environment:
    return Environment(
        stdout=Console(width=100),
        stderr=Console(stderr=True, force_terminal=terminal, width=100, _environ={"TERM": term}),
        stdin_isatty=False,
    )


def test_term_dumb_gets_plain_progress_lines(tmp_path: Path) -> None:
    env = _plain(terminal=True, term="dumb")
    assert not env.stderr_is_terminal
    with use(env):
        result = CliRunner().invoke(app, [*SEND, "--yes", "--store", str(tmp_path / "j.db")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 12 and lines[-1].startswith("[12/12] sent ")
    assert _plain(terminal=True).stderr_is_terminal  # a real terminal keeps its bar


def test_off_a_terminal_nothing_is_wrapped_or_cut(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    bad = "not-an-address-" + LONG.replace("@", "-at-")
    (tmp_path / "l.csv").write_text(f"name,email\nAda,{LONG}\nBen,{bad}\n")
    args = ["--csv", str(tmp_path / "l.csv"), "--template", str(tmp_path / "t.txt")]
    narrow = {"COLUMNS": "30"}
    preview = bulkmail("preview", *args, "--subject", "Hi", env=narrow)
    assert preview.exit_code == 0, preview.output
    assert f"Ada <{LONG}>" in preview.stdout
    dry = bulkmail("send-reminders", *args, "--subject", "Hi", "--dry-run", env=narrow)
    assert dry.exit_code == 0, dry.output
    assert (
        bad in dry.stdout and "invalid address: An email address must have an @-sign" in dry.stdout
    )
    store = tmp_path / ("deep-folder-name-" * 4) / "jobs.db"
    store.parent.mkdir()
    sent = bulkmail(
        "send-reminders", *args, "--subject", "Hi", "--yes", "--store", str(store), env=narrow
    )
    assert f"bulkmail: new job store at {store}\n" in sent.stderr


def test_messages_on_stderr_carry_the_prefix(tmp_path: Path) -> None:
    store = str(tmp_path / "j.db")
    assert bulkmail(*SEND, "--store", store).exit_code == 0
    out = tmp_path / "r.csv"
    result = bulkmail("report", "1", "--output", str(out), "--store", store)
    assert result.stderr == "bulkmail: wrote 12 rows to " + str(out) + "\n"
    missing = bulkmail("status", "7", "--store", store)
    assert missing.exit_code == 2 and missing.stderr.startswith("bulkmail: ")


def test_worker_log_times_are_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())
    logger = logging.getLogger("bulkmail")
    saved, logger.handlers = logger.handlers, []
    try:
        setup_logging(timestamps=True)
        handler = logger.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.stream = buf = io.StringIO()
        logger.warning("job store error: x")
    finally:
        logger.handlers = saved
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ bulkmail: job store error: x\n", buf.getvalue()
    )


def test_report_json_is_the_rows(tmp_path: Path) -> None:
    store = str(tmp_path / "j.db")
    assert bulkmail(*SEND, "--store", store).exit_code == 0
    result = bulkmail("report", "1", "--json", "--store", store)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and len(rows) == 12
    csv_text = bulkmail("report", "1", "--store", store).stdout
    assert csv_text.splitlines()[0].split(",") == list(rows[0])
    assert rows[0]["state"] == "sent" and rows[0]["in_doubt"] is False
    assert rows[0]["sent_at"].endswith("Z")
    assert bulkmail("report", "2", "--json", "--store", store).exit_code == 2
    both = bulkmail("report", "1", "--json", "-o", str(tmp_path / "x"), "--store", store)
    assert both.exit_code == 2


def test_cancel_json_is_the_job_document(tmp_path: Path) -> None:
    store = tmp_path / "j.db"
    assert bulkmail(*SEND, "--store", str(store)).exit_code == 0
    with sqlite3.connect(store) as conn:  # as if the run had been interrupted
        conn.execute("UPDATE deliveries SET state = 'pending' WHERE position > 10")
        conn.execute("UPDATE jobs SET state = 'paused', finished_at = NULL")
    result = bulkmail("cancel", "1", "--json", "--store", str(store))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    status = json.loads(bulkmail("status", "1", "--json", "--store", str(store)).stdout)
    assert doc == status
    assert doc["state"] == "cancelled" and doc["cancelled"] >= 1


@pytest.mark.parametrize("key", ["source", "provider", "total", "pending", "skipped", "rate"])
def test_dry_run_and_status_share_their_keys(tmp_path: Path, key: str) -> None:
    (tmp_path / "l.csv").write_text(
        (EXAMPLES / "instructors.csv").read_text(encoding="utf-8") + "Bad,not-an-address,X,Y\n",
        encoding="utf-8",
    )
    args = [*SEND, "--store", str(tmp_path / "j.db")]
    args[2] = str(tmp_path / "l.csv")
    dry = json.loads(bulkmail(*args, "--dry-run", "--json").stdout)
    assert bulkmail(*args).exit_code == 0
    status = json.loads(bulkmail("status", "1", "--json", "--store", str(tmp_path / "j.db")).stdout)
    before_sending = {**status, "pending": status["total"] - status["skipped"]}
    assert dry[key] == before_sending[key]
    assert dry["skips"][0]["email"] == "not-an-address"
