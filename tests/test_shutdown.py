"""Clean shutdown and one worker's trouble staying its own (issue 11, items 1, 2, 6 and 8).

- the store: a worker's own stop (``paused``, or a ``local`` abort) only takes it out of a
  job other live workers go on with; the last live worker's stop is the job's;
- the views: a stalled job's deliveries in ``sending`` are in doubt before any resume;
- the send loop: ten transient failures in a row with another live worker on the job;
- real processes and real signals: SIGTERM in the foreground finishes the message in flight
  (exit 143) and nothing is sent twice; Ctrl-C or SIGTERM at the confirmation prompt creates
  no job (130, 143); SIGTERM of one of three workers on one PostgreSQL job: the others finish
  it, every recipient exactly once, counted at the SMTP server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkmail import documents, jobs
from bulkmail.config import Settings, SmtpSettings
from bulkmail.errors import ExitCode, Terminated, exit_code_for, exit_code_of
from bulkmail.liveness import this_host
from bulkmail.manager import EmailManager
from bulkmail.store import Claimed, Counts, JobState, Outcome, Store, open_store
from tests.e2e import process_env, write_recipients
from tests.smtp_sink import SinkProcess, free_port, start_sink_process
from tests.test_store import always_alive, join, never_alive, new_job, people, start
from tests.test_tty import SEND, Terminal, jobs_in
from tests.test_tty import env_for as tty_env

BULKMAIL = str(Path(sys.executable).parent / "bulkmail")

# -- exit codes ---------------------------------------------------------------------------


def test_sigterm_is_143_and_ctrl_c_130() -> None:
    assert exit_code_of(Terminated()) == ExitCode.TERMINATED
    assert exit_code_of(KeyboardInterrupt()) == ExitCode.INTERRUPTED
    assert (int(ExitCode.TERMINATED), int(ExitCode.INTERRUPTED)) == (143, 130)
    paused = exit_code_for("paused", Counts(sent=1), interrupted=True, terminated=True)
    assert paused == ExitCode.TERMINATED
    # the README's table documents every exit code, and only those
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1].strip() for line in table.splitlines() if "|" in line]
    documented = {int(cell) for cell in first_cells if cell.isdigit()}
    assert documented == {int(code) for code in ExitCode}


# -- the store: finish_worker -------------------------------------------------------------


class TestFinishWorker:
    def test_a_paused_worker_leaves_while_another_live_worker_goes_on(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        join(store, job_id, "w2", now=100.0)
        state = store.finish_worker(
            "w1", now=101.0, stop="paused", error="interrupted (SIGTERM)", alive=always_alive
        )
        assert state == JobState.RUNNING
        view = store.view(job_id)
        assert view.job.state == JobState.RUNNING and view.job.error is None
        # the last live worker's stop is the job's
        assert (
            store.finish_worker(
                "w2", now=102.0, stop="paused", error="server down", alive=always_alive
            )
            == JobState.PAUSED
        )
        assert store.view(job_id).job.error == "server down"

    def test_other_workers_that_are_gone_do_not_keep_the_job(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        join(store, job_id, "w2", now=100.0)
        state = store.finish_worker(
            "w1", now=101.0, stop="paused", error="interrupted", alive=never_alive
        )
        assert state == JobState.PAUSED

    def test_a_local_abort_leaves_and_a_job_wide_one_aborts(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(3), now=1.0, domain="d")
        start(store, job_id, "w1")
        join(store, job_id, "w2", now=100.0)
        join(store, job_id, "w3", now=100.0)
        greeting = "554 5.7.1 no service for this host"
        assert (
            store.finish_worker(
                "w1", now=101.0, stop="aborted", error=greeting, local=True, alive=always_alive
            )
            == JobState.RUNNING
        )
        # rejected credentials are the job's own: aborted at once, whoever else is on it
        assert (
            store.finish_worker(
                "w2", now=102.0, stop="aborted", error="535 login rejected", alive=always_alive
            )
            == JobState.ABORTED
        )
        assert store.view(job_id).job.error == "535 login rejected"

    def test_a_worker_leaving_a_finished_job_completes_it(self, store: Store) -> None:
        job_id = store.create_job(new_job(), people(1), now=1.0, domain="d")
        start(store, job_id, "w1")
        join(store, job_id, "w2", now=100.0)
        c = store.claim(job_id, "w1", now=100.0)
        assert isinstance(c, Claimed)
        store.record(Outcome.sent(c.delivery.id, None, 100.0), "w1")
        state = store.finish_worker("w1", now=101.0, stop="paused", error="x", alive=always_alive)
        assert state == JobState.COMPLETED


# -- the views: honest counts -------------------------------------------------------------


def test_a_stalled_jobs_messages_in_flight_are_in_doubt_before_any_resume(
    store: Store,
) -> None:
    job_id = store.create_job(new_job(), people(4), now=1.0, domain="d")
    store.register_worker(
        job_id, worker_id="w1", host=this_host(), pid=os.getpid(), now=100.0, alive=never_alive
    )
    for _ in range(2):
        assert isinstance(store.claim(job_id, "w1", now=100.0), Claimed)
    # w1 heart-beats (this process runs): running, its two messages in flight are pending
    doc = documents.job_document(store.view(job_id), now=101.0)
    assert (doc["state"], doc["pending"], doc["sending"], doc["in_doubt"]) == (
        "running",
        4,
        2,
        0,
    )
    # its heartbeat is stale: stalled, the two may have been delivered
    doc = documents.job_document(store.view(job_id), now=1000.0)
    assert (doc["state"], doc["pending"], doc["sending"], doc["in_doubt"]) == (
        "stalled",
        2,
        2,
        2,
    )
    # a run that ended without recording it (a store error) is gone too: stalled
    doc = documents.job_document(store.view(job_id), now=101.0, gone=["w1"])
    assert (doc["state"], doc["in_doubt"]) == ("stalled", 2)
    # resumed: they are marked in doubt (counted once, even when in flight once more)
    store.register_worker(job_id, worker_id="w2", host="h", pid=1, now=2000.0, alive=never_alive)
    assert store.counts(job_id).in_doubt == 2
    store.claim(job_id, "w2", now=2000.0)
    doc = documents.job_document(store.view(job_id), now=9000.0)
    assert (doc["state"], doc["sending"], doc["in_doubt"]) == ("stalled", 1, 2)


# -- the send loop: a worker's own transient failures --------------------------------------


def test_ten_transient_failures_take_one_worker_out_of_a_shared_job(tmp_path: Path) -> None:
    """The server refuses this worker's connections; another live worker is on the job:
    this worker leaves it untried, the job goes on running."""
    store = open_store(tmp_path / "jobs.db")
    settings = Settings(
        provider="smtp",
        sender="office@example.edu",
        smtp=SmtpSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2.0),
    )
    csv, _ = write_recipients(tmp_path, 12)
    plan = jobs.plan(
        jobs.SourceOptions(csv=str(csv), template=str(tmp_path / "t.txt"), subject="x"),
        jobs.SendOptions(provider="smtp", rate=0),
        settings,
    )
    job_id = jobs.create_job(store, plan)
    now = time.time()
    # another worker of this very process: live (its pid runs, its heartbeat is fresh)
    store.register_worker(
        job_id, worker_id="other", host=this_host(), pid=os.getpid(), now=now, alive=never_alive
    )
    mgr = EmailManager(
        store,
        job_id,
        provider_factory=jobs.provider_factory(settings),
        clock=lambda: now,
        sleep=lambda _s: False,
        exclusive=False,
    )
    result = mgr.run()
    assert result.state == JobState.RUNNING
    assert "10 consecutive transient failures" in (result.error or "")
    assert result.hint is not None and "left job" in result.hint
    view = store.view(job_id)
    assert view.job.state == JobState.RUNNING
    assert (view.counts.pending, view.counts.sending, view.counts.failed) == (12, 0, 0)
    assert {d.attempts for d in store.deliveries(job_id)} == {0}  # released untried
    # the last live worker failing the same way pauses the job
    assert (
        store.finish_worker(
            "other", now=now, stop="paused", error="server down", alive=always_alive
        )
        == JobState.PAUSED
    )
    store.close()


# -- real processes, real signals ----------------------------------------------------------


@pytest.fixture
def held_sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """Holds its reply to the 3rd message for 1.5 s: a signal sent once that message is
    recorded (at the end of its data) lands while it is in flight."""
    s = start_sink_process(tmp_path, "held", delay=0.02, slow_messages={3: 1.5})
    yield s
    s.stop()


def send_args(csv: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["send-reminders", "--yes", "--csv", str(csv), "--template", str(tmp_path / "t.txt"),
            "--subject", "Reminder for {{ name }}", *extra]  # fmt: skip


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BULKMAIL, *args], env=env, capture_output=True, text=True, timeout=60)


def per_recipient(sink: SinkProcess) -> Counter[str]:
    return Counter(r["recipient"] for r in sink.received())


def test_sigterm_in_the_foreground_finishes_the_message_in_flight(
    tmp_path: Path, held_sink: SinkProcess
) -> None:
    csv, emails = write_recipients(tmp_path, 20)
    env = process_env(tmp_path, port=held_sink.port, store=str(tmp_path / "jobs.db"))
    proc = subprocess.Popen(
        [BULKMAIL, *send_args(csv, tmp_path, "--rate", "0")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    held_sink.wait_for(3)  # the 3rd message's data is in; its reply is held back
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "terminated" in err and "bulkmail resume 1" in err
    third = held_sink.received()[2]["recipient"]
    status = run_cli(env, "status", "1", "--json")
    doc: dict[str, Any] = json.loads(status.stdout)
    assert doc["state"] == "paused" and doc["in_doubt"] == 0 and doc["sending"] == 0
    assert doc["sent"] == len(held_sink.received()) >= 3
    delivered = {d["email"]: d for d in _report(env)}
    assert delivered[third]["state"] == "sent"  # finished, not abandoned
    resumed = run_cli(env, "resume", "1", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["in_doubt"] == 0
    counts = per_recipient(held_sink)
    assert set(counts) == set(emails) and set(counts.values()) == {1}  # nobody twice


def _report(env: dict[str, str]) -> list[dict[str, str]]:
    import csv as csv_module

    done = run_cli(env, "report", "1")
    assert done.returncode == 0, done.stderr
    return list(csv_module.DictReader(done.stdout.splitlines()))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_the_confirmation_prompt_creates_no_job(
    tmp_path: Path, signum: int, code: int
) -> None:
    env = tty_env(tmp_path)
    if "PYTHONPATH" in os.environ:  # the checkout under test, not the installed copy
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    term = Terminal(SEND, env)
    term.expect("Continue?")
    term.proc.send_signal(signum)
    assert term.finish() == code, term.seen
    assert "no job created" in term.seen and "Traceback" not in term.seen
    assert "Aborted" not in term.seen
    assert jobs_in(tmp_path) == 0
    assert not (tmp_path / "home" / "data" / "bulkmail" / "outbox").exists()


def test_sigterm_of_one_of_three_workers_leaves_the_job_to_the_others(
    tmp_path: Path, pg_url: str
) -> None:
    """Three `bulkmail worker` processes on one PostgreSQL job; one gets SIGTERM mid-run:
    it finishes its message in flight and leaves (exit 143); the two others finish the
    job; at the server every recipient arrives exactly once."""
    sink = start_sink_process(tmp_path, "received", delay=0.005)
    store = open_store(pg_url)
    try:
        n = 400
        csv, emails = write_recipients(tmp_path, n)
        settings = Settings(
            provider="smtp",
            sender="Course Office <office@example.edu>",
            smtp=SmtpSettings(host="127.0.0.1", port=sink.port, security="none", timeout=10.0),
        )
        plan = jobs.plan(
            jobs.SourceOptions(csv=str(csv), template=str(tmp_path / "t.txt"),
                               subject="Reminder for {{ name }}"),
            jobs.SendOptions(provider="smtp", rate=0),
            settings,
        )  # fmt: skip
        job_id = jobs.create_job(store, plan)
        env = process_env(tmp_path, port=sink.port, store=store.url)
        procs = [
            subprocess.Popen([BULKMAIL, "worker", str(job_id)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not any(
                w.pid == procs[0].pid and w.sent >= 5 for w in store.view(job_id).workers
            ):  # the first worker is sending
                assert time.monotonic() < deadline, "the first worker never sent"
                time.sleep(0.02)
            procs[0].send_signal(signal.SIGTERM)
            outputs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        codes = [p.returncode for p in procs]
        assert codes == [143, 0, 0], outputs
        assert f"job {job_id} running" in outputs[0][0]  # it left; the job went on
        view = store.view(job_id)
        assert view.job.state == JobState.COMPLETED
        assert (view.counts.sent, view.counts.in_doubt, view.counts.sending) == (n, 0, 0)
        counts = per_recipient(sink)
        assert set(counts) == set(emails)  # planned = delivered
        assert [e for e, c in counts.items() if c > 1] == []  # no duplicate
        leaver = next(w for w in view.workers if w.pid == procs[0].pid)
        assert leaver.stopped_at is not None and 0 < leaver.sent < n
        assert sum(w.sent for w in view.workers) == n
    finally:
        store.close()
        sink.stop()
