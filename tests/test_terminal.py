"""Terminal behaviour without a pseudo-terminal: the commands run in an injected
``Environment`` (Rich consoles that say they are, or are not, a terminal; stdin a terminal
or not), in-process with typer's CliRunner. ``test_tty.py`` keeps the same checks on a
real pseudo-terminal."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from bulkmail.cli import app
from bulkmail.cli.env import Environment, use
from tests.e2e import EXAMPLES, SUBJECT, data_dir
from tests.smtp_sink import SmtpSink

SEND = [
    "send-reminders",
    "--csv",
    str(EXAMPLES / "instructors.csv"),
    "--template",
    str(EXAMPLES / "reminder.txt"),
    "--subject",
    "Reminder: {{ course }}",
]


def terminal(*, stdin: bool = True, stderr: bool = True) -> Environment:
    """An environment whose stdin and stderr are (or are not) a terminal; the consoles
    write to the CliRunner's captured streams."""
    return Environment(
        stdout=Console(width=100),
        stderr=Console(stderr=True, force_terminal=stderr, width=100),
        stdin_isatty=stdin,
    )


def run(env: Environment, *args: str, answers: str | None = None) -> Result:
    with use(env):
        result = CliRunner().invoke(app, list(args), input=answers)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def plain_text(output: str) -> str:
    """Terminal output without its escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)


def jobs_in(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "jobs.db"


def test_on_a_terminal_the_send_is_confirmed_and_no_means_nothing(store: Path) -> None:
    result = run(terminal(), *SEND, "--store", str(store), answers="n\n")
    assert result.exit_code == 0, result.output
    assert "Send 12 reminders via outbox" in result.stderr
    assert "Continue?" in result.stderr
    assert "nothing sent and no job created" in result.stderr
    assert jobs_in(store) == 0
    assert not (data_dir() / "outbox").exists()


def test_yes_on_a_terminal_sends_with_a_live_bar(store: Path) -> None:
    result = run(terminal(), *SEND, "--store", str(store), answers="y\n")
    assert result.exit_code == 0, result.output
    assert "Continue?" in result.stderr
    assert "12/12" in result.stderr
    assert "[1/12] sent" not in result.stderr  # the bar, not plain lines
    assert "completed" in result.stdout
    assert len(list((data_dir() / "outbox").glob("*.eml"))) == 12


def test_without_a_terminal_nothing_is_asked_and_progress_is_plain_lines(store: Path) -> None:
    result = run(terminal(stdin=False, stderr=False), *SEND, "--yes", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert "Continue?" not in result.stderr
    assert "\x1b[" not in result.stderr  # no escape codes in a log file
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 12 and lines[-1].startswith("[12/12] sent ")


def test_yes_skips_the_question_on_a_terminal(store: Path) -> None:
    result = run(terminal(), *SEND, "--yes", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert "Continue?" not in result.stderr and jobs_in(store) == 1


def test_select_picks_rows_by_number_and_range(store: Path) -> None:
    result = run(terminal(), *SEND, "--select", "--yes", "--store", str(store), answers="2-3, 12\n")
    assert result.exit_code == 0, result.output
    assert "Send to which" in result.stderr
    text = "".join(p.read_text() for p in (data_dir() / "outbox").glob("*.eml"))
    assert text.count("To: ") == 3
    assert "b.okafor@example.edu" in text and "zoe.angstrom@example.edu" in text
    assert "ada.whitfield@example.edu" not in text


def test_a_bad_selection_is_asked_again(store: Path) -> None:
    result = run(terminal(), *SEND, "--select", "--yes", "--store", str(store), answers="99\n1\n")
    assert result.exit_code == 0, result.output
    assert "'99' is outside 1-12" in plain_text(result.stderr)
    assert len(list((data_dir() / "outbox").glob("*.eml"))) == 1


def test_select_needs_a_terminal(store: Path) -> None:
    result = run(terminal(stdin=False), *SEND, "--select", "--store", str(store))
    assert result.exit_code == 2
    assert "--select needs a terminal" in result.stderr
    assert jobs_in(store) == 0


def test_status_watch_is_a_bar_on_a_terminal_and_a_line_elsewhere(store: Path) -> None:
    assert (
        run(terminal(stdin=False, stderr=False), *SEND, "--yes", "--store", str(store)).exit_code
        == 0
    )
    live = run(terminal(), "status", "1", "--watch", "--store", str(store))
    assert live.exit_code == 0, live.output
    assert "12/12" in live.stderr and "completed" in live.stdout
    plain = run(terminal(stderr=False), "status", "1", "--watch", "--store", str(store))
    assert plain.stderr.strip() == "job 1 completed: 12 sent, 0 failed, 0 pending of 12"


def test_the_bar_ends_at_the_total_when_the_store_skips_at_claim_time(
    smtp_sink: SmtpSink, store: Path
) -> None:
    """A skip the store makes at claim time under a --dedupe-key sends no event: the bar
    must still end at the total. Job 1 fails one address; job 2 under the same key (created
    after it) sends that address; `retry 1` then finds it taken when it claims it."""
    env = {
        "BULKMAIL_SMTP_HOST": smtp_sink.host,
        "BULKMAIL_SMTP_PORT": str(smtp_sink.port),
        "BULKMAIL_SMTP_SECURITY": "none",
    }
    send = [
        "send-reminders", "--csv", str(EXAMPLES / "instructors.csv"),
        "--template", str(EXAMPLES / "reminder.txt"), "--subject", SUBJECT,
        "--provider", "smtp", "--from", "office@example.edu", "--rate", "0",
        "--dedupe-key", "autumn", "--store", str(store), "--yes",
    ]  # fmt: skip
    plain = terminal(stdin=False, stderr=False)
    smtp_sink.replies["chen.wei@example.edu"] = "550 5.1.1 mailbox unavailable"
    with use(plain):
        first = CliRunner().invoke(app, [*send, "--new-store"], env=env)
    assert first.exit_code == 1, first.output
    del smtp_sink.replies["chen.wei@example.edu"]
    with use(plain):
        second = CliRunner().invoke(app, send, env=env)
    assert second.exit_code == 0, second.output
    with use(terminal()):
        retried = CliRunner().invoke(app, ["retry", "1", "--store", str(store)], env=env)
    assert retried.exit_code == 0, retried.output
    assert "job 1: 1 failed deliveries back to pending" in retried.stderr
    bars = re.findall(r"(\d+)/12", retried.stderr)
    assert bars and bars[-1] == "12", retried.stderr  # was 11/12: the skip sent no event
    status = json.loads(
        CliRunner().invoke(app, ["status", "1", "--json", "--store", str(store)]).stdout
    )
    assert (status["sent"], status["skipped"], status["failed"]) == (11, 1, 0)
    received = [m.rcpt_tos[0] for m in smtp_sink.messages]
    assert received.count("chen.wei@example.edu") == 1  # by job 2 only
