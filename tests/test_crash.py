"""Real processes: detached workers killed with SIGKILL at each step of a delivery, Ctrl-C in
the foreground, two processes sharing one rate limit, cron re-runs. The SMTP server is a
separate process that records (and fsyncs) every message before it answers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkmail.liveness import pid_running
from tests.e2e import process_env, write_recipients
from tests.smtp_sink import SinkProcess, start_sink_process

REPO = Path(__file__).resolve().parent.parent
BULKMAIL = str(Path(sys.executable).parent / "bulkmail")


Sink = SinkProcess


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = start_sink_process(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[Sink]:
    s = start_sink_process(tmp_path, "slow", delay=0.04)
    yield s
    s.stop()


def env_for(tmp_path: Path, sink: Sink, **extra: str) -> dict[str, str]:
    return process_env(tmp_path, port=sink.port, store=str(tmp_path / "jobs.db"), **extra)


def bulkmail(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BULKMAIL, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def send_args(csv: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["send-reminders", "--yes", "--csv", str(csv), "--template", str(tmp_path / "t.txt"),
            "--subject", "Reminder for {{ name }}", *extra]  # fmt: skip


def status(env: dict[str, str], job: int = 1) -> dict[str, Any]:
    done = bulkmail(env, "status", str(job), "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def wait_dead(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        assert time.monotonic() < deadline, f"worker {pid} still running"
        time.sleep(0.02)


def check_store(path: Path, total: int) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"))
    assert sum(counts.values()) == total
    return counts


def assert_delivered(sink: Sink, emails: list[str], *, max_duplicates: int) -> list[str]:
    """Everyone received; duplicates only up to the allowance and each with the same id.
    Returns the duplicated addresses."""
    got = sink.received()
    per_rcpt = Counter(r["recipient"] for r in got)
    assert set(per_rcpt) == set(emails), set(emails) - set(per_rcpt)
    dupes = [e for e, n in per_rcpt.items() if n > 1]
    assert len(dupes) <= max_duplicates and all(per_rcpt[e] == 2 for e in dupes)
    for e in dupes:
        ids = {r["message_id"] for r in got if r["recipient"] == e}
        assert len(ids) == 1, ids
    return dupes


@pytest.mark.parametrize(
    ("point", "rate", "in_doubt", "duplicates"),
    [
        # rate-limited: each outcome is committed on its own, so before the 4th claim
        # nothing is in flight and nothing is in doubt
        ("before_claim", "100", 0, 0),
        # unlimited: the 3rd outcome rides in the 4th claim's transaction (one commit per
        # message), so a kill before that commit leaves the 3rd message in doubt
        ("before_claim", "0", 1, 1),
        ("after_claim", "0", 1, 0),  # 'sending' committed, never handed to the server
        ("after_send", "0", 1, 1),  # the server has it, 'sent' not committed: resent once
        ("after_send", "100", 1, 1),
    ],
)
def test_kill_9_at_each_step_then_resume(
    tmp_path: Path, sink: Sink, point: str, rate: str, in_doubt: int, duplicates: int
) -> None:
    csv, emails = write_recipients(tmp_path, 8)
    env = env_for(tmp_path, sink)
    started = bulkmail(
        {**env, "BULKMAIL_FAILPOINT": f"{point}:4"},
        *send_args(csv, tmp_path, "--rate", rate, "--burst", "8", "--detach", "--json"),
    )
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["worker_pid"]
    wait_dead(pid)
    doc = status(env)
    assert doc["state"] == "stalled"
    assert doc["sent"] == (2 if point == "before_claim" and rate == "0" else 3)
    resumed = bulkmail(env, "resume", "1", "--json")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(resumed.stdout)
    assert (final["state"], final["sent"], final["in_doubt"]) == ("completed", 8, in_doubt)
    dupes = assert_delivered(sink, emails, max_duplicates=duplicates)
    assert len(dupes) == duplicates
    assert check_store(tmp_path / "jobs.db", 8) == {"sent": 8}
    # a second resume of the finished job sends nothing
    again = bulkmail(env, "resume", "1")
    assert again.returncode == 0 and "nothing to resume" in again.stdout
    assert len(sink.received()) == 8 + duplicates


def test_kill_9_from_outside_during_a_slow_reply(tmp_path: Path, slow_sink: Sink) -> None:
    csv, emails = write_recipients(tmp_path, 10)
    env = env_for(tmp_path, slow_sink)
    started = bulkmail(env, *send_args(csv, tmp_path, "--rate", "0", "--detach", "--json"))
    assert started.returncode == 0, started.stderr
    doc = json.loads(started.stdout)
    assert doc["log_path"] and Path(doc["log_path"]).exists()
    assert oct(Path(doc["log_path"]).stat().st_mode & 0o777) == "0o600"
    slow_sink.wait_for(3)
    os.kill(doc["worker_pid"], signal.SIGKILL)
    wait_dead(doc["worker_pid"])
    assert status(env)["state"] == "stalled"
    resumed = bulkmail(env, "resume", "1", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "completed"
    assert_delivered(slow_sink, emails, max_duplicates=1)
    assert check_store(tmp_path / "jobs.db", 10) == {"sent": 10}


@pytest.fixture
def held_sink(tmp_path: Path) -> Iterator[Sink]:
    """The slow sink, holding its reply to the 2nd message for a second: a Ctrl-C sent
    once that message is recorded (at the end of its data) lands while it is in flight."""
    s = start_sink_process(tmp_path, "held", delay=0.04, slow_messages={2: 1.0})
    yield s
    s.stop()


def test_ctrl_c_pauses_and_resume_finishes(tmp_path: Path, held_sink: Sink) -> None:
    slow_sink = held_sink  # Ctrl-C comes while the 2nd message waits for its reply
    csv, emails = write_recipients(tmp_path, 20)  # enough that the job is still running at Ctrl-C
    env = env_for(tmp_path, slow_sink)
    proc = subprocess.Popen(
        [BULKMAIL, *send_args(csv, tmp_path, "--rate", "0")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    slow_sink.wait_for(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "bulkmail resume 1" in err
    assert "Traceback" not in err
    doc = status(env)
    assert doc["state"] == "paused" and 2 <= doc["sent"] < 20
    resumed = bulkmail(env, "resume", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert_delivered(slow_sink, emails, max_duplicates=0)


def test_resume_refuses_while_a_live_worker_holds_the_job_and_cancel_stops_it(
    tmp_path: Path, slow_sink: Sink
) -> None:
    csv, _ = write_recipients(tmp_path, 200)  # still running when resume and cancel come
    env = env_for(tmp_path, slow_sink)
    started = bulkmail(env, *send_args(csv, tmp_path, "--rate", "0", "--detach", "--json"))
    pid = json.loads(started.stdout)["worker_pid"]
    slow_sink.wait_for(1)
    refused = bulkmail(env, "resume", "1")
    assert refused.returncode == 2
    assert f"being run by worker pid {pid}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    cancelled = bulkmail(env, "cancel", "1")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    wait_dead(pid, timeout=15)
    doc = status(env)
    assert doc["state"] == "cancelled"
    assert doc["sent"] + doc["cancelled"] + doc["pending"] == 200 and doc["pending"] == 0
    assert len(slow_sink.received()) == doc["sent"] < 200


def test_status_watch_follows_a_detached_job_to_the_end(tmp_path: Path, slow_sink: Sink) -> None:
    csv, _ = write_recipients(tmp_path, 6)
    env = env_for(tmp_path, slow_sink)
    started = bulkmail(env, *send_args(csv, tmp_path, "--rate", "0", "--detach"))
    assert started.returncode == 0 and "bulkmail status 1 --watch" in started.stdout
    watched = bulkmail(env, "status", "1", "--watch", "--json")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["state"] == "completed"
    assert "job 1 completed: 6 sent" in watched.stderr


def test_two_processes_share_one_rate_limit(tmp_path: Path, sink: Sink) -> None:
    """Two cron jobs on one account at 10/s, burst 1: at the server, never more than
    10 * t + 1 messages in any window of t seconds (plus one for scheduling jitter)."""
    env = env_for(tmp_path, sink)
    csv_a, _ = write_recipients(tmp_path, 8, "a.csv")
    csv_b, _ = write_recipients(tmp_path, 8, "b.csv")
    csv_b.write_text(csv_b.read_text().replace("instructor", "lecturer"))
    args = ["--rate", "10", "--burst", "1", "--yes"]
    procs = [
        subprocess.Popen([BULKMAIL, *send_args(c, tmp_path, *args)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in (csv_a, csv_b)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    times = sorted(r["time"] for r in sink.received())
    assert len(times) == 16
    # one shared limit: 16 sends take 1.5 s (two separate limits would take 0.75 s)
    assert times[-1] - times[0] >= 15 / 10 * 0.8
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            window = times[j] - start
            assert j - i + 1 <= 10 * window + 1 + 1


def test_cron_rerun_with_the_same_dedupe_key_sends_nothing(tmp_path: Path, sink: Sink) -> None:
    csv, emails = write_recipients(tmp_path, 5)
    env = env_for(tmp_path, sink)
    args = send_args(csv, tmp_path, "--rate", "0", "--dedupe-key", "grades-2026", "--json")
    first = bulkmail(env, *args, "--new-store")  # the first run starts the store
    assert first.returncode == 0, first.stderr
    second = bulkmail(env, *args)
    assert second.returncode == 0, second.stderr
    doc = json.loads(second.stdout)
    # everyone already reminded: no job at all (issue 14)
    assert (doc["id"], doc["already_reminded"], doc["dedupe_key"]) == (None, 5, "grades-2026")
    assert sorted(r["recipient"] for r in sink.received()) == emails
    assert bulkmail(env, "report", "2").returncode == 2  # no job 2
    # one new name on the list: a job for it, the five others skipped with the reason
    csv, emails = write_recipients(tmp_path, 6)
    third = bulkmail(env, *args)
    assert third.returncode == 0, third.stderr
    doc = json.loads(third.stdout)
    assert (doc["id"], doc["sent"], doc["skipped"], doc["state"]) == (2, 1, 5, "completed")
    assert sorted(r["recipient"] for r in sink.received()) == emails
    report = bulkmail(env, "report", "2")
    assert report.stdout.count("already sent under dedupe key 'grades-2026' (job 1)") == 5
