"""Several worker processes on one job, sharing a real PostgreSQL store, sending to a real
SMTP server (a separate process that records every message it accepts):

- four workers on 2,000 recipients: every recipient exactly once;
- the same with one worker killed with SIGKILL mid-run: nobody is missed, and the only
  duplicate is its in-doubt delivery, resent with the same Message-ID;
- two workers sharing one rate limit never exceed it in any window, at the server.

Skipped, with the reason, where no PostgreSQL server can be had (see tests/pg.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bulkmail import jobs
from bulkmail.config import Settings, SmtpSettings
from bulkmail.liveness import pid_running, this_host
from bulkmail.store import Store, open_store
from tests.e2e import process_env, write_recipients
from tests.smtp_sink import SinkProcess, start_sink_process

REPO = Path(__file__).resolve().parent.parent
BULKMAIL = str(Path(sys.executable).parent / "bulkmail")


Sink = SinkProcess


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = start_sink_process(tmp_path, "received")
    yield s
    s.stop()


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    s = open_store(pg_url)
    yield s
    s.close()


def env_for(tmp_path: Path, sink: Sink, store: Store, **extra: str) -> dict[str, str]:
    return process_env(tmp_path, port=sink.port, store=store.url, **extra)


def create_job(store: Store, sink: Sink, tmp_path: Path, n: int, *, rate: float = 0.0,
               burst: int = 1) -> tuple[int, list[str]]:  # fmt: skip
    """A job as `send-reminders` would create it, not yet run."""
    csv, emails = write_recipients(tmp_path, n)
    settings = Settings(
        provider="smtp",
        sender="Course Office <office@example.edu>",
        smtp=SmtpSettings(host="127.0.0.1", port=sink.port, security="none", timeout=10.0),
    )
    plan = jobs.plan(
        jobs.SourceOptions(csv=str(csv), template=str(tmp_path / "t.txt"),
                           subject="Reminder for {{ name }}"),
        jobs.SendOptions(provider="smtp", rate=rate, burst=burst),
        settings,
    )  # fmt: skip
    return jobs.create_job(store, plan), emails


Procs = list[subprocess.Popen[str]]


@contextlib.contextmanager
def heartbeating(store: Store, worker_id: str, every: float = 1.0) -> Iterator[None]:
    """Renew a worker's heartbeat in the background, as a live worker does."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            store.heartbeat(worker_id, now=time.time())

    thread = threading.Thread(target=beat, name=f"heartbeat-{worker_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def start_workers(
    env: dict[str, str], job_id: int, count: int, extra: dict[int, dict[str, str]] | None = None
) -> Procs:
    """``count`` independent `bulkmail worker JOB_ID` processes, as on several hosts."""
    extra = extra or {}
    return [
        subprocess.Popen([BULKMAIL, "worker", str(job_id)], env={**env, **extra.get(n, {})},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for n in range(count)
    ]  # fmt: skip


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def assert_each_once(sink: Sink, emails: list[str]) -> None:
    per_rcpt = Counter(r["recipient"] for r in sink.received())
    assert set(per_rcpt) == set(emails), f"missed: {sorted(set(emails) - set(per_rcpt))[:5]}"
    assert [e for e, n in per_rcpt.items() if n > 1] == []


def test_four_workers_send_each_of_2000_recipients_exactly_once(
    tmp_path: Path, sink: Sink, store: Store
) -> None:
    """`send-reminders --workers 4`: four detached local workers on one job."""
    csv, emails = write_recipients(tmp_path, 2000)
    env = env_for(tmp_path, sink, store)
    started = subprocess.run(
        [BULKMAIL, "send-reminders", "--csv", str(csv), "--template", str(tmp_path / "t.txt"),
         "--subject", "Reminder for {{ name }}", "--rate", "0", "--workers", "4", "--json",
         "--yes"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    doc = json.loads(started.stdout)
    job_id = doc["id"]
    pids = [w["pid"] for w in doc["workers"]]
    try:
        assert len(pids) == 4
        wait_until(lambda: store.view(job_id).job.state == "completed", 60, "the job to end")
        wait_until(lambda: not any(pid_running(p) for p in pids), 20, "the workers to exit")
    finally:
        for pid in pids:
            if pid_running(pid):
                os.kill(pid, 9)
    view = store.view(job_id)
    assert (view.counts.sent, view.counts.in_doubt) == (2000, 0)
    assert_each_once(sink, emails)
    assert sorted(w.pid for w in view.workers) == sorted(pids)
    assert sum(w.sent for w in view.workers) == 2000
    assert all(w.sent > 0 for w in view.workers), [w.sent for w in view.workers]
    # status shows who did what: host, pid, heartbeat and sent of each worker
    shown = subprocess.run([BULKMAIL, "status", str(job_id)], env={**env, "COLUMNS": "200"},
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "workers" in shown.stdout
    for w in view.workers:
        assert str(w.pid) in shown.stdout and w.host in shown.stdout
    # the log of the detached workers is the job's one log
    log = Path(view.job.log_path or "")
    assert log.read_text().count("starting job") == 4


def test_a_worker_killed_mid_run_loses_nobody_and_resends_only_its_in_doubt_message(
    tmp_path: Path, sink: Sink, store: Store
) -> None:
    """Four `bulkmail worker` processes; one is killed with SIGKILL right after the server
    accepted its 150th message (before `sent` is recorded). The three others take over
    its in-doubt delivery, resent once with the same Message-ID; nobody is missed."""
    job_id, emails = create_job(store, sink, tmp_path, 2000)
    env = env_for(tmp_path, sink, store)
    procs = start_workers(env, job_id, 4, {0: {"BULKMAIL_FAILPOINT": "after_send:150"}})
    try:
        errors = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == -9, errors[0]
    assert [p.returncode for p in procs[1:]] == [0, 0, 0], errors
    # the killed worker's message is taken over either at a survivor's heartbeat or, when a
    # survivor started after the kill, at its registration
    taken_over = ("in flight under a worker that is gone", "in flight when the last worker stopped")
    assert any(m in e for e in errors[1:] for m in taken_over), errors
    view = store.view(job_id)
    assert view.job.state == "completed"
    assert (view.counts.sent, view.counts.in_doubt) == (2000, 1)
    killed = next(w for w in view.workers if w.pid == procs[0].pid)
    assert killed.stopped_at is not None and killed.sent == 149
    doubt = [d for d in store.deliveries(job_id) if d.in_doubt]
    got = sink.received()
    per_rcpt = Counter(r["recipient"] for r in got)
    assert set(per_rcpt) == set(emails)  # nobody missed
    dupes = [e for e, n in per_rcpt.items() if n > 1]
    assert dupes == [doubt[0].email] and per_rcpt[dupes[0]] == 2
    assert {r["message_id"] for r in got if r["recipient"] == dupes[0]} == {doubt[0].message_id}


def test_two_workers_share_one_rate_limit_measured_at_the_server(
    tmp_path: Path, sink: Sink, store: Store
) -> None:
    """40 messages at 20/s, burst 2, by two worker processes: never more than
    20 * t + 2 messages in any window of t seconds (plus one for scheduling jitter)."""
    rate, burst, n = 20.0, 2, 40
    job_id, emails = create_job(store, sink, tmp_path, n, rate=rate, burst=burst)
    env = env_for(tmp_path, sink, store)
    procs = start_workers(env, job_id, 2)
    try:
        errors = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    assert_each_once(sink, emails)
    view = store.view(job_id)
    # both took part (a worker that starts late may send only a few)
    assert len(view.workers) == 2 and sum(w.sent for w in view.workers) == n
    times = sorted(r["time"] for r in sink.received())
    assert times[-1] - times[0] >= (n - burst) / rate * 0.9  # one shared limit, not two
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= rate * (times[j] - start) + burst + 1


def test_resume_refuses_a_job_a_live_worker_holds_but_a_worker_joins_it(
    tmp_path: Path, sink: Sink
) -> None:
    """`resume` (also `--workers N`) is exclusive; `bulkmail worker` adds itself. On SQLite:
    nothing here needs a server."""
    store = open_store(tmp_path / "jobs.db")
    job_id, emails = create_job(store, sink, tmp_path, 5)
    # a live worker (this very process) holds the job, and has sent nothing yet; being
    # live, it heartbeats (else, on a loaded machine, its heartbeat goes stale and the
    # other workers rightly take it for gone)
    store.register_worker(job_id, worker_id="holder", host=this_host(), pid=os.getpid(),
                          now=time.time(), alive=lambda w: False)  # fmt: skip
    env = env_for(tmp_path, sink, store)
    with heartbeating(store, "holder"):
        for args in (["resume", str(job_id)], ["resume", str(job_id), "--workers", "2"]):
            refused = subprocess.run([BULKMAIL, *args], env=env, capture_output=True,
                                     text=True, timeout=60)  # fmt: skip
            assert refused.returncode == 2, refused.stderr
            assert f"being run by worker pid {os.getpid()}" in refused.stderr
        assert sink.received() == []
        joined = subprocess.run([BULKMAIL, "worker", str(job_id)], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert_each_once(sink, emails)
    view = store.view(job_id)
    assert view.job.state == "completed"  # nothing is left, whoever else is still on it
    assert {w.id: w.stopped_at is None for w in view.workers}["holder"]
    assert store.finish_worker("holder", now=time.time(), stop=None, error=None) == "completed"
    store.close()
