"""The job store on real SQLite files: the file itself (private, WAL, full sync, refused when it
is not a store), and that no secret is ever written to it. The helpers here make the jobs of
every store test; the contract itself is tested on every backend in test_store_contract.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bulkmail.errors import StoreError
from bulkmail.liveness import STALE_AFTER, worker_alive
from bulkmail.store import JobStore, NewDelivery, NewJob, WorkerRecord, open_store


def new_job(**overrides: object) -> NewJob:
    values: dict[str, object] = dict(
        provider="outbox",
        provider_settings={"dir": "/tmp/x"},
        account="outbox:/tmp/x",
        sender="Office <office@example.edu>",
        subject="Hi {{ name }}",
        templates={"text": "Hello {{ name }}", "html": None, "attachments": []},
        source="list.csv",
        rate=0.0,
        burst=1,
        concurrency=1,
        max_retries=3,
        backoff=5.0,
        dedupe_key=None,
    )
    values.update(overrides)
    return NewJob(**values)  # type: ignore[arg-type]


def people(n: int, *, skip: dict[int, str] | None = None) -> list[NewDelivery]:
    skip = skip or {}
    return [
        NewDelivery(i + 2, f"p{i}@example.edu", f"Person {i}", {"course": f"C{i}"}, skip.get(i))
        for i in range(n)
    ]


def never_alive(_w: WorkerRecord) -> bool:
    return False


def always_alive(_w: WorkerRecord) -> bool:
    return True


def start(store: JobStore, job_id: int, worker: str = "w1", now: float = 100.0) -> None:
    """Run the job under one worker (exclusive: as `resume` does)."""
    store.register_worker(job_id, worker_id=worker, host="h", pid=1, now=now, alive=never_alive)


def alive_at(now: float) -> Callable[[WorkerRecord], bool]:
    """Liveness as another host sees it at ``now``: by the heartbeat alone."""
    return lambda w: worker_alive(w, now=now, host="another-host", stale_after=STALE_AFTER)


def join(store: JobStore, job_id: int, worker: str, now: float) -> None:
    """Add a worker to the job (not exclusive: as `worker` does)."""
    store.register_worker(
        job_id,
        worker_id=worker,
        host=f"host-{worker}",
        pid=1000,
        now=now,
        alive=alive_at(now),
        exclusive=False,
    )


def test_store_file_is_private_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "jobs.db"
    s = open_store(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_not_a_store_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("this is not sqlite " * 100)
    with pytest.raises(StoreError, match="not a bulkmail job store"):
        open_store(bogus)


def test_the_store_never_holds_a_secret(tmp_path: Path) -> None:
    from bulkmail.config import load_settings

    settings = load_settings(
        env={"BULKMAIL_SMTP_PASSWORD": "hunter2-secret", "BULKMAIL_MAILTRAP_TOKEN": "tok-secret"}
    )
    path = tmp_path / "s.db"
    s = open_store(path)
    for provider in ("smtp", "mailtrap"):
        s.create_job(
            new_job(provider=provider, provider_settings=settings.provider_public(provider)),
            people(1),
            now=1.0,
            domain="d",
        )
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.db"))
    assert b"hunter2-secret" not in raw and b"tok-secret" not in raw
    assert os.path.getsize(path) > 0
