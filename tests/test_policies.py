"""What resume, retry and a joining worker decide for a job in each state (``bulkmail.jobs``),
and the exit codes, computed in one module (``bulkmail.errors``): on a real SQLite store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bulkmail import jobs
from bulkmail.config import Settings
from bulkmail.errors import (
    ConfigError,
    ExitCode,
    InputError,
    JobNotFound,
    JobStateError,
    StoreError,
    exit_code_for,
    exit_code_of,
)
from bulkmail.liveness import this_host
from bulkmail.store import Counts, Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "jobs.db")


def new_job(store: Store) -> int:
    Path("list.csv").write_text("name,email\nAda,ada@example.edu\nBen,ben@example.edu\n")
    Path("t.txt").write_text("Hello {{ name }}")
    plan = jobs.plan(
        jobs.SourceOptions(csv="list.csv", template="t.txt", subject="Hi"),
        jobs.SendOptions(provider="outbox", rate=0),
        Settings(),
    )
    return jobs.create_job(store, plan)


def completed_job(store: Store) -> int:
    job_id = new_job(store)
    result = jobs.manager(store, job_id, Settings()).run()
    assert result.state == "completed"
    return job_id


def test_exit_code_for_how_a_run_ended() -> None:
    failed = Counts(sent=1, failed=1)
    assert exit_code_for("completed", Counts(sent=2)) == ExitCode.OK
    assert exit_code_for("completed", failed) == ExitCode.SOME_FAILED
    for state in ("paused", "aborted", "stalled", "cancelled"):
        assert exit_code_for(state, Counts(sent=2)) == ExitCode.STOPPED
    assert exit_code_for("completed", Counts(sent=2), interrupted=True) == ExitCode.INTERRUPTED


def test_exit_code_of_an_error() -> None:
    for error in (InputError("x"), ConfigError("x"), JobNotFound(3), JobStateError("x")):
        assert exit_code_of(error) == ExitCode.BAD_INPUT
    assert exit_code_of(StoreError("x")) == ExitCode.BAD_INPUT
    assert exit_code_of(KeyboardInterrupt()) == ExitCode.INTERRUPTED
    assert exit_code_of(ValueError("a bug")) is None


def test_resume_runs_an_unfinished_job_and_reports_a_finished_one(store: Store) -> None:
    queued = new_job(store)
    assert jobs.check_resume(store, queued) is None
    done = completed_job(store)
    nothing = jobs.check_resume(store, done)
    assert nothing is not None
    assert nothing.message == f"job {done} is completed; nothing to resume"
    assert nothing.exit_code == ExitCode.OK and nothing.view.job.id == done
    store.cancel(queued, now=time.time())
    cancelled = jobs.check_resume(store, queued)
    assert cancelled is not None
    assert cancelled.message == f"job {queued} is cancelled; nothing to resume"
    assert cancelled.exit_code == ExitCode.STOPPED


def test_retry_of_a_completed_job_without_failures_has_nothing_to_do(store: Store) -> None:
    done = completed_job(store)
    nothing = jobs.prepare_retry(store, done)
    assert isinstance(nothing, jobs.NothingToDo)
    assert nothing.message == f"job {done} has no failed deliveries; nothing to retry"
    assert nothing.exit_code == ExitCode.OK
    assert jobs.prepare_retry(store, new_job(store)) == 0  # a queued job: run it


def test_retry_refuses_a_job_a_live_worker_runs(store: Store) -> None:
    job_id = new_job(store)
    now = time.time()
    store.register_worker(
        job_id,
        worker_id="w1",
        host=this_host(),
        pid=os.getpid(),
        now=now,
        alive=lambda w: True,
        exclusive=True,
    )
    with pytest.raises(JobStateError, match=f"job {job_id} is being run by a worker"):
        jobs.prepare_retry(store, job_id, now=now)


def test_a_worker_joining_a_finished_job_has_nothing_to_do(store: Store) -> None:
    done = completed_job(store)
    nothing = jobs.joined_too_late(store, done, exclusive=False)
    assert nothing is not None
    assert nothing.message == f"job {done} is already completed"
    assert nothing.exit_code == ExitCode.OK
    assert jobs.joined_too_late(store, done, exclusive=True) is None  # the refusal stands
    assert jobs.joined_too_late(store, new_job(store), exclusive=False) is None
