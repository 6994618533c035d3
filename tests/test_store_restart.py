"""A PostgreSQL store restarted mid-job (``pg_ctl restart -m fast``: every connection cut,
the server back within a second) does not stop its workers (issue 11, item 7): two
`bulkmail worker` processes ride it out by retrying their store calls, and the job completes
with every recipient sent exactly once, nothing in doubt and no manual step. Checked at the
SMTP server. Skipped, with the reason, without a throwaway cluster (see tests/pg.py)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkmail.store import Store, open_store
from tests.pg import PgServer
from tests.smtp_sink import SinkProcess, start_sink_process
from tests.test_multiworker import create_job, env_for, start_workers


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    s = start_sink_process(tmp_path, "received")
    yield s
    s.stop()


def test_workers_survive_a_fast_restart_of_the_store_with_no_duplicate(
    tmp_path: Path, sink: SinkProcess, pg_server: PgServer, pg_url: str
) -> None:
    store: Store = open_store(pg_url)
    n = 240
    job_id, emails = create_job(store, sink, tmp_path, n, rate=40.0, burst=2)  # ~6 s
    env = env_for(tmp_path, sink, store)
    store.close()
    procs = start_workers(env, job_id, 2)
    try:
        deadline = time.monotonic() + 60
        while len(sink.received()) < 40:
            assert time.monotonic() < deadline, "the workers never got going"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        pg_server.restart()  # mid-job: both workers are claiming and recording
        restarted_at = len(sink.received())
        errors = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    assert restarted_at < n, "the job ended before the restart: nothing was tested"
    assert any("job store error" in e and "trying again" in e for e in errors), errors
    store = open_store(pg_url)
    try:
        view = store.view(job_id)
        assert view.job.state == "completed"
        assert (view.counts.sent, view.counts.in_doubt, view.counts.total) == (n, 0, n)
    finally:
        store.close()
    got = sink.received()
    per_rcpt = Counter(r["recipient"] for r in got)
    assert set(per_rcpt) == set(emails)  # planned = delivered
    assert [e for e, c in per_rcpt.items() if c > 1] == []  # no duplicate
