"""Issue 12: "Two processes on one store with --per-hour 30 and a fake clock: never more than
30 in any hour, measured from the sink."

Two real `bulkmail worker` processes share one SQLite store and a 75-recipient job with
``per_hour`` 30 and no rate limit, under libfaketime running their wall clocks ``SPEED``
times fast: the job spans three hours of their time (30, 30, then 15 messages) in seconds.

How the sink's times are made comparable with the workers' (what "an hour" is):

- Both workers run under ONE ``faketime`` process (a small launcher starts them), so they
  share libfaketime's start time through its shared memory: their clocks agree with each
  other, as two processes of one host must for the caps on a SQLite store (its claims use
  the caller's clock). Two separate ``faketime`` commands would each start their own fast
  clock, seconds (times ``SPEED``) apart.
- The sink runs in this (unfaked) process and records each message's arrival on the real
  monotonic clock at the end of its DATA. libfaketime's fast clock is ``start + SPEED *
  (real - start)``, so a rolling hour of the workers' time is exactly ``3600 / SPEED`` real
  seconds wherever it starts: counting arrivals in every such real window needs neither the
  start nor a header the sender wrote (a Date header has whole seconds, and says when the
  message was built, not when the server had it).
- The store's ``sent_at`` (the workers' fast time) is checked the same way, as a second view.

With the caps' log holding each message at its claim's time only (as before schema 8), this
test saw 32 in an hour at the sink in 2 runs of 2: a message claimed early but slow to go out
(the first of a connection) left the log's hour before it left the server's. Each sent
message's row now moves to when the send ended; 5 runs of 5 saw exactly 30.

``FAKETIME_DONT_FAKE_MONOTONIC=1`` keeps the monotonic clock real: the workers' waits and
lease fencing run in real seconds, their heartbeats (``heartbeat_at``, judged by the wall
clock) every ``BULKMAIL_HEARTBEAT_INTERVAL`` real seconds, which is ``SPEED`` times that
on the fast clock: ``BULKMAIL_STALE_AFTER`` is set well above it. libfaketime 0.9.10 with
that setting makes Python's ``time.sleep`` fail with EINVAL (its absolute monotonic
``clock_nanosleep``), which bulkmail only calls when retrying the store: the launcher
routes it through ``threading.Event.wait`` in the workers, which libfaketime leaves alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkmail import jobs
from bulkmail.config import Settings, SmtpSettings
from bulkmail.store import Store, open_store
from tests.e2e import process_env, write_recipients
from tests.smtp_sink import SmtpSink

SPEED = 360  # an hour of the workers' time in 10 real s (x60: two hours of waiting, 2+ min)
HOUR = 3600.0
PER_HOUR, RECIPIENTS = 30, 75

# a worker: `bulkmail worker JOB_ID`, with time.sleep made to work under libfaketime
WORKER = (
    "import sys, threading, time\n"
    "time.sleep = lambda s: threading.Event().wait(max(0.0, s)) and None\n"
    "sys.argv = ['bulkmail', 'worker', sys.argv[1]]\n"
    "from bulkmail.cli import main\n"
    "main()\n"
)
# the launcher, run under one faketime: both workers share its fast clock
LAUNCH = (
    "import json, subprocess, sys\n"
    "job, out = sys.argv[1], sys.argv[2]\n"
    "procs = [subprocess.Popen([sys.executable, '-c', sys.argv[3], job],\n"
    "          stdout=subprocess.DEVNULL, stderr=open(f'{out}.{n}', 'w')) for n in range(2)]\n"
    "print(json.dumps([p.wait() for p in procs]))\n"
)

pytestmark = pytest.mark.skipif(
    shutil.which("faketime") is None, reason="needs libfaketime (faketime; .ci/run has it)"
)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def most_in_a_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any half-open window ``[t, t + window)``."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_most_in_a_window() -> None:
    assert most_in_a_window([], 10) == 0
    assert most_in_a_window([0, 1, 9.9, 10, 25], 10) == 3
    assert most_in_a_window([0, 10, 20], 10) == 1


def create_job(store: Store, sink: SmtpSink, tmp_path: Path) -> tuple[int, list[str]]:
    """A job as `send-reminders --per-hour 30 --rate 0` makes it, not yet run."""
    csv, emails = write_recipients(tmp_path, RECIPIENTS)
    settings = Settings(
        provider="smtp",
        sender="Course Office <office@example.edu>",
        smtp=SmtpSettings(host="127.0.0.1", port=sink.port, security="none", timeout=10.0),
    )
    plan = jobs.plan(
        jobs.SourceOptions(
            csv=str(csv), template=str(tmp_path / "t.txt"), subject="Reminder for {{ name }}"
        ),
        jobs.SendOptions(provider="smtp", rate=0.0, per_hour=PER_HOUR),
        settings,
    )
    return jobs.create_job(store, plan), emails


def test_two_workers_under_a_fast_clock_never_send_more_than_30_in_any_hour(
    tmp_path: Path, sink: SmtpSink
) -> None:
    store = open_store(tmp_path / "jobs.db")
    try:
        job_id, emails = create_job(store, sink, tmp_path)
        env = process_env(
            tmp_path,
            port=sink.port,
            store=store.url,
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            BULKMAIL_HEARTBEAT_INTERVAL="0.25",  # real seconds: 90 s of the fast clock
            BULKMAIL_STALE_AFTER="3600",  # of the fast clock (10 real seconds)
        )
        launcher = subprocess.run(
            ["faketime", "-f", f"+0 x{SPEED}", sys.executable, "-c", LAUNCH,
             str(job_id), str(tmp_path / "worker.err"), WORKER],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        errors = [(tmp_path / f"worker.err.{n}").read_text() for n in range(2)]
        assert launcher.returncode == 0, (launcher.stderr, errors)
        assert json.loads(launcher.stdout) == [0, 0], errors

        view = store.view(job_id)
        assert view.job.state == "completed", errors
        assert (view.counts.sent, view.counts.in_doubt, view.counts.failed) == (RECIPIENTS, 0, 0)
        shares = sorted(w.sent for w in view.workers)
        assert len(shares) == 2 and sum(shares) == RECIPIENTS, shares

        # every planned message arrived exactly once: by recipient and by Message-ID
        got = sink.messages
        assert Counter(m.rcpt_tos[0] for m in got) == Counter(emails)
        planned = {d.message_id for d in store.deliveries(job_id)}
        arrived = Counter(str(m.parse()["Message-ID"]) for m in got)
        assert set(arrived) == planned and set(arrived.values()) == {1}

        # the cap, at the sink: an hour of the fast clock is 3600 / SPEED real seconds
        arrivals = [m.received_at for m in got]
        span = (max(arrivals) - min(arrivals)) * SPEED
        assert most_in_a_window(arrivals, HOUR / SPEED) == PER_HOUR, span
        assert 2 * HOUR <= span < 3 * HOUR  # three hours of the fast clock, not more
        # ... and by the workers' own record of when each went out
        sent_at = [d.sent_at for d in store.deliveries(job_id) if d.sent_at is not None]
        assert most_in_a_window(sent_at, HOUR) == PER_HOUR
    finally:
        store.close()
