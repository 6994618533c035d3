"""On a terminal: the confirmation prompt and --select, driven through a real pseudo-terminal."""

from __future__ import annotations

import os
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BULKMAIL = str(Path(sys.executable).parent / "bulkmail")


class Terminal:
    """A bulkmail process whose stdin, stdout and stderr are a pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [BULKMAIL, *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"never saw {text!r} in {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the process closed the terminal
                    break

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode())

    def finish(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout} s: {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        os.close(self.master)
        return self.proc.wait(timeout)


def env_for(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "LANG": "C.UTF-8",
        "TERM": "xterm",
        "BULKMAIL_STORE": str(tmp_path / "jobs.db"),
    }


def jobs_in(tmp_path: Path) -> int:
    db = tmp_path / "jobs.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


SEND = [
    "send-reminders",
    "--csv",
    str(REPO / "examples" / "instructors.csv"),
    "--template",
    str(REPO / "examples" / "reminder.txt"),
    "--subject",
    "Reminder: {{ course }}",
]


def test_terminal_asks_before_sending_and_no_means_nothing(tmp_path: Path) -> None:
    term = Terminal(SEND, env_for(tmp_path))
    term.expect("Send 12 reminders via outbox")
    term.expect("Continue?")
    term.send("n")
    assert term.finish() == 0
    assert "nothing sent" in term.seen
    assert jobs_in(tmp_path) == 0
    assert not (tmp_path / "home" / "data" / "bulkmail" / "outbox").exists()


def test_terminal_yes_sends_with_a_live_progress_bar(tmp_path: Path) -> None:
    term = Terminal(SEND, env_for(tmp_path))
    term.expect("Continue?")
    term.send("y")
    assert term.finish() == 0
    assert "12/12" in term.seen and "completed" in term.seen
    assert len(list((tmp_path / "home" / "data" / "bulkmail" / "outbox").glob("*.eml"))) == 12


def test_select_picks_rows_by_number_and_range(tmp_path: Path) -> None:
    term = Terminal([*SEND, "--select", "--yes"], env_for(tmp_path))
    term.expect("Send to which")
    term.send("2-3, 12")
    assert term.finish() == 0, term.seen
    emls = sorted((tmp_path / "home" / "data" / "bulkmail" / "outbox").glob("*.eml"))
    assert len(emls) == 3
    text = "".join(p.read_text() for p in emls)
    assert "b.okafor@example.edu" in text and "zoe.angstrom@example.edu" in text
    assert "ada.whitfield@example.edu" not in text
