"""Job creation in batches under the state ``creating`` (issue 11, item 9): workers of other
jobs on the same SQLite store keep sending while a big job is created; a crash during
creation leaves a ``creating`` job that nothing runs and that ``resume`` refuses; bad input
still leaves no job; the dedupe key sees earlier batches and other jobs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkmail.errors import InputError, JobStateError
from bulkmail.store import JobState, NewDelivery, NewJob, Store, open_store
from bulkmail.store.sql import CREATE_BATCH
from tests.smtp_sink import SinkProcess, start_sink_process
from tests.test_multiworker import BULKMAIL, create_job, env_for, start_workers

REPO = Path(__file__).resolve().parent.parent


def new_job(dedupe_key: str | None = None) -> NewJob:
    return NewJob(
        provider="outbox", provider_settings={}, account="outbox", sender="o@example.edu",
        subject="Hi", templates={"text": "x"}, source="list.csv", rate=0.0, burst=1,
        concurrency=1, max_retries=3, backoff=5.0, dedupe_key=dedupe_key,
    )  # fmt: skip


def people(n: int, start: int = 0) -> Iterator[NewDelivery]:
    for i in range(start, start + n):
        yield NewDelivery(i + 2, f"person{i}@example.edu", f"Person {i}", {"course": "CS1"})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "jobs.db")
    yield s
    s.close()


def test_a_big_job_is_queued_with_every_delivery_in_order(store: Store) -> None:
    n = 2 * CREATE_BATCH + 7
    job_id = store.create_job(new_job(), people(n), now=1.0, domain="example.edu")
    view = store.view(job_id)
    assert (view.job.state, view.job.total, view.job.error) == (JobState.QUEUED, n, None)
    assert view.counts.pending == n
    got = list(store.deliveries(job_id))
    assert [d.position for d in got] == list(range(1, n + 1))
    assert got[-1].message_id == f"<bulkmail.{job_id}.{n}.{view.job.token}@example.edu>"
    assert got[0].fields == {"course": "CS1"} and got[0].row == 2


def test_bad_input_in_a_later_batch_leaves_no_job(store: Store) -> None:
    def rows() -> Iterator[NewDelivery]:
        yield from people(CREATE_BATCH + 10)
        raise InputError("list.csv: row 5012: template uses undefined variable 'x'")

    with pytest.raises(InputError):
        store.create_job(new_job(), rows(), now=1.0, domain="example.edu")
    assert store.recent(10) == []
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar() == 0


def test_the_dedupe_key_sees_earlier_batches_and_other_jobs(store: Store) -> None:
    first = store.create_job(new_job("autumn"), people(3), now=1.0, domain="example.edu")
    # the second job holds person1 (pending in job `first`) and, past its first batch,
    # person2 again: skipped both times, by the other job
    rows = [*people(CREATE_BATCH, start=10), *people(2, start=1)]
    second = store.create_job(new_job("autumn"), rows, now=2.0, domain="example.edu")
    skipped = list(store.deliveries(second, states=("skipped",)))
    assert [d.email for d in skipped] == ["person1@example.edu", "person2@example.edu"]
    assert all(f"job {first}" in (d.last_error or "") for d in skipped)


def test_a_creating_job_is_never_run_and_resume_refuses_it(store: Store) -> None:
    def rows() -> Iterator[NewDelivery]:
        yield from people(CREATE_BATCH + 1)
        # meanwhile: the job is `creating`, its first batch written, and nobody runs it
        job_id = store.recent(1)[0].job.id
        view = store.view(job_id)
        assert view.job.state == JobState.CREATING
        assert view.counts.pending == CREATE_BATCH and view.job.total == CREATE_BATCH
        with pytest.raises(JobStateError, match="creating"):
            store.register_worker(job_id, worker_id="w", host="h", pid=1, now=2.0,
                                  alive=lambda w: False)  # fmt: skip

    job_id = store.create_job(new_job(), rows(), now=1.0, domain="example.edu")
    assert store.get_job(job_id).state == JobState.QUEUED


CREATE_AND_DIE = """\
import sys
from bulkmail.store import NewDelivery, NewJob, open_store
store = open_store(sys.argv[1])
new = NewJob(provider="smtp", provider_settings={}, account="smtp:x", sender="o@example.edu",
             subject="Hi", templates={"text": "Dear {{ name }}"}, source="big.csv", rate=0.0,
             burst=1, concurrency=1, max_retries=3, backoff=5.0, dedupe_key=None)
rows = (NewDelivery(i + 2, f"p{i}@example.edu", f"P {i}", {}) for i in range(int(sys.argv[2])))
store.create_job(new, rows, now=1.0, domain="example.edu")
"""


def test_a_crash_during_creation_leaves_a_creating_job_that_sends_nothing(
    tmp_path: Path, store: Store
) -> None:
    script = tmp_path / "create.py"
    script.write_text(CREATE_AND_DIE)
    env = {**os.environ, "BULKMAIL_FAILPOINT": "creating:1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, str(script), store.location, str(2 * CREATE_BATCH)],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    [view] = store.recent(10)
    job_id = view.job.id
    assert view.job.state == JobState.CREATING
    assert view.job.error == f"interrupted while creating; bulkmail cancel {job_id}"
    assert view.counts.pending == CREATE_BATCH  # half a job: written, never sent
    cli_env = {**env, "BULKMAIL_STORE": store.location, "HOME": str(tmp_path / "home"),
               "COLUMNS": "200"}  # fmt: skip
    cli_env.pop("BULKMAIL_FAILPOINT")
    shown = subprocess.run([BULKMAIL, "status", str(job_id), "--json"], env=cli_env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    doc = json.loads(shown.stdout)
    assert (doc["state"], doc["error"]) == ("creating", view.job.error)
    for args in (["resume", str(job_id)], ["worker", str(job_id)]):
        refused = subprocess.run([BULKMAIL, *args], env=cli_env, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert f"bulkmail cancel {job_id}" in refused.stderr, refused.stderr
    counts = store.counts(job_id)
    assert (counts.sent, counts.sending, counts.pending) == (0, 0, CREATE_BATCH)
    # what it tells to do works: nothing of it is left to send
    assert store.cancel(job_id, now=2.0) == CREATE_BATCH
    assert store.get_job(job_id).state == JobState.CANCELLED


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    s = start_sink_process(tmp_path, "received")
    yield s
    s.stop()


def test_a_worker_keeps_sending_while_a_big_job_is_created_on_the_same_store(
    tmp_path: Path, sink: SinkProcess, store: Store
) -> None:
    """A worker of job A sends at 20/s to a real SMTP server while job B of 50,000 rows is
    created on the same SQLite file: the longest pause between two messages at the server
    during the creation stays near the rate's own interval, never the creation's length."""
    job_a, _ = create_job(store, sink, tmp_path, 2000, rate=20.0, burst=1)
    procs = start_workers(env_for(tmp_path, sink, store), job_a, 1)
    try:
        deadline = time.monotonic() + 60
        while len(sink.received()) < 5:
            assert time.monotonic() < deadline and procs[0].poll() is None, "A never started"
            time.sleep(0.05)
        started = time.time()
        job_b = store.create_job(new_job(), people(50_000), now=started, domain="example.edu")
        ended = time.time()
        store.cancel(job_a, now=time.time())
        procs[0].communicate(timeout=60)
    finally:
        if procs[0].poll() is None:
            procs[0].kill()
    assert store.counts(job_b).pending == 50_000
    times = sorted(r["time"] for r in sink.received())
    during = [started, *(t for t in times if started < t < ended), ended]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert len(during) > 3, "the creation was too quick to tell"
    assert max(gaps) < 1.0, (
        f"a pause of {max(gaps):.2f} s during a {ended - started:.1f} s creation"
    )
