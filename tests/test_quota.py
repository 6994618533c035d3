"""Issue 12: caps per account counted in the claim's transaction (both backends), the
worker's windows, --not-before and --not-after with an injected clock, back-pressure from
real servers (aiosmtpd answering 450 4.7.1, a Mailtrap fake answering 429), run-due, and
opening a store of schema 3."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from bulkmail import jobs
from bulkmail.config import MailtrapSettings, Settings
from bulkmail.documents import job_document
from bulkmail.errors import ExitCode
from bulkmail.manager import EmailManager, Event
from bulkmail.store import Store, open_store
from bulkmail.store.records import (
    SCHEMA_VERSION,
    ClaimedBatch,
    NewDelivery,
    NewJob,
    Stop,
    Wait,
)
from tests.e2e import bulkmail
from tests.smtp_sink import SmtpSink, free_port
from tests.test_manager import FakeClock, settings_for

ACCOUNT = "smtp:office@example.edu"
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC, a Friday


def new_job(**kw: Any) -> NewJob:
    base: dict[str, Any] = {
        "provider": "outbox",
        "provider_settings": {},
        "account": ACCOUNT,
        "sender": "office@example.edu",
        "subject": "s",
        "templates": {"text": "t"},
        "source": "test",
        "rate": 0.0,
        "burst": 1,
        "concurrency": 1,
        "max_retries": 3,
        "backoff": 5.0,
        "dedupe_key": None,
    }
    return NewJob(**{**base, **kw})


def people(n: int, prefix: str = "p") -> list[NewDelivery]:
    return [NewDelivery(i, f"{prefix}{i}@example.edu", f"P{i}", {}) for i in range(n)]


def registered(store: Store, job_id: int, worker: str, now: float) -> None:
    store.register_worker(job_id, worker_id=worker, host="h", pid=1, now=now, alive=lambda w: True)


# --------------------------------------------------------------------------- caps


def test_hourly_cap_is_counted_across_jobs_in_the_claim(store: Store) -> None:
    clock = FakeClock(T0)
    store.clock = clock  # the store's time (the database's clock on PostgreSQL otherwise)
    a = store.create_job(new_job(per_hour=3), people(5, "a"), now=T0, domain="x")
    b = store.create_job(new_job(per_hour=3), people(5, "b"), now=T0, domain="x")
    registered(store, a, "wa", T0)
    registered(store, b, "wb", T0)
    for _n in range(2):
        assert not isinstance(store.claim(a, "wa", now=clock()), Wait | Stop)
        clock.now += 60
    assert not isinstance(store.claim(b, "wb", now=clock()), Wait | Stop)  # the 3rd in the hour
    held = store.claim(a, "wa", now=clock())
    assert isinstance(held, Wait)
    assert held.why == f"hourly cap 3/3 on {ACCOUNT}"
    # the oldest send (at T0) leaves the rolling hour at T0 + 3600
    assert held.seconds == pytest.approx(T0 + 3600 - clock())
    assert isinstance(store.claim(b, "wb", now=clock()), Wait)  # the other job too
    clock.now = T0 + 3600.5
    assert not isinstance(store.claim(b, "wb", now=clock()), Wait | Stop)
    assert isinstance(store.claim(a, "wa", now=clock()), Wait)  # the 2nd (T0+60) still in


def test_a_batch_claim_takes_no_more_than_the_caps_leave(store: Store) -> None:
    """Mailtrap batches claim many deliveries at once: never more than the rolling hour
    has room for, and then the same Wait as a single claim."""
    clock = FakeClock(T0)
    store.clock = clock
    job = store.create_job(new_job(per_hour=5), people(12), now=T0, domain="x")
    registered(store, job, "w", T0)
    assert not isinstance(store.claim(job, "w", now=clock()), Wait | Stop)  # 1 of 5
    batch = store.claim_batch(job, "w", now=clock(), limit=100)
    assert isinstance(batch, ClaimedBatch) and len(batch.deliveries) == 4
    held = store.claim_batch(job, "w", now=clock(), limit=100)
    assert isinstance(held, Wait) and held.why == f"hourly cap 5/5 on {ACCOUNT}"
    clock.now = T0 + 3600.5  # all five leave the rolling hour together
    again = store.claim_batch(job, "w", now=clock(), limit=100)
    assert isinstance(again, ClaimedBatch) and len(again.deliveries) == 5


def test_daily_cap_waits_for_the_oldest_send_of_the_day(store: Store) -> None:
    clock = FakeClock(T0)
    store.clock = clock
    job = store.create_job(new_job(per_day=2), people(4), now=T0, domain="x")
    registered(store, job, "w", T0)
    store.claim(job, "w", now=clock())
    clock.now += 5000
    store.claim(job, "w", now=clock())
    clock.now += 5000
    held = store.claim(job, "w", now=clock())
    assert isinstance(held, Wait) and held.why == f"daily cap 2/2 on {ACCOUNT}"
    assert held.seconds == pytest.approx(86400 - 10000)


def test_two_stores_never_share_out_more_than_the_cap(tmp_path: Path) -> None:
    """Two workers in their own connections (as two processes) claiming from two jobs on one
    account at once: the cap's last slot is taken once."""
    path = tmp_path / "jobs.db"
    first, second = open_store(path), open_store(path)
    clock = FakeClock(T0)
    jobs_ = [
        s.create_job(new_job(per_hour=30), people(40, p), now=T0, domain="x")
        for s, p in ((first, "a"), (second, "b"))
    ]
    claimed: list[int] = []
    lock = threading.Lock()

    def work(store: Store, job_id: int, worker: str) -> None:
        registered(store, job_id, worker, T0)
        while True:
            got = store.claim(job_id, worker, now=clock())
            if isinstance(got, Wait | Stop):
                return
            with lock:
                claimed.append(job_id)

    threads = [
        threading.Thread(target=work, args=(s, j, f"w{j}"))
        for s, j in ((first, jobs_[0]), (second, jobs_[1]))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 30
    first.close()
    second.close()


# --------------------------------------------------------------------------- the worker


def make_plan_job(
    store: Store,
    settings: Settings,
    n: int,
    *,
    now: float,
    **send: Any,
) -> int:
    Path("list.csv").write_text(
        "name,email\n" + "".join(f"N{i},p{i}@example.edu\n" for i in range(n))
    )
    Path("t.txt").write_text("Hello {{ name }}")
    plan = jobs.plan(
        jobs.SourceOptions(csv="list.csv", template="t.txt", subject="Reminder {{ name }}"),
        jobs.SendOptions(provider="smtp", rate=0.0, tz="Europe/Berlin", **send),
        settings,
        now=now,
    )
    return jobs.create_job(store, plan, now=now)


def run(store: Store, job_id: int, settings: Settings, clock: FakeClock) -> tuple[Any, list[Event]]:
    events: list[Event] = []
    mgr = EmailManager(
        store,
        job_id,
        provider_factory=jobs.provider_factory(settings),
        clock=clock,
        sleep=clock.sleep,
        on_event=events.append,
    )
    return mgr.run(), events


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "jobs.db")
    yield s
    s.close()


def test_not_before_makes_a_scheduled_job_and_the_worker_waits_visibly(
    smtp_sink: SmtpSink, lite: Store
) -> None:
    settings = settings_for(smtp_sink)
    clock = FakeClock(T0)
    job = make_plan_job(lite, settings, 3, now=T0, not_before="2027-01-15T11:00")
    assert lite.get_job(job).state == "scheduled"
    assert lite.due_jobs(now=T0) == []
    start = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()  # 11:00 CET
    assert lite.due_jobs(now=start) == [job]
    result, events = run(lite, job, settings, clock)
    assert result.state == "completed" and result.exit_code == ExitCode.OK
    waits = [e for e in events if e.kind == "waiting"]
    assert waits and waits[0].error == "--not-before 2027-01-15 11:00 CET"
    assert waits[0].until == start
    assert all(d.sent_at is not None and d.sent_at >= start for d in lite.deliveries(job))
    assert lite.get_job(job).waiting_for is None  # cleared once sending


def test_outside_the_window_the_worker_waits_until_it_opens(
    smtp_sink: SmtpSink, lite: Store
) -> None:
    settings = settings_for(smtp_sink)
    start = datetime(2027, 1, 15, 20, 0, tzinfo=UTC).timestamp()  # Fri 21:00 CET
    clock = FakeClock(start)
    job = make_plan_job(lite, settings, 2, now=start, windows=["Mon-Fri 08:00-18:00"])
    seen: list[dict[str, Any]] = []

    def look(event: Event) -> None:
        if event.kind == "waiting":
            seen.append(dict(job_document(lite.view(job), now=clock())))

    mgr = EmailManager(
        lite,
        job,
        provider_factory=jobs.provider_factory(settings),
        clock=clock,
        sleep=clock.sleep,
        on_event=look,
    )
    result = mgr.run()
    assert result.state == "completed"
    monday = datetime(2027, 1, 18, 7, 0, tzinfo=UTC).timestamp()  # Mon 08:00 CET
    assert seen[0]["waiting_for"] == "outside --window Mon-Fri 08:00-18:00"
    assert seen[0]["waiting_until"] == "2027-01-18T07:00:00Z"
    from bulkmail.ui import waiting_line

    assert waiting_line(seen[0]) == (  # type: ignore[arg-type]
        "waiting: outside --window Mon-Fri 08:00-18:00; next send 2027-01-18 08:00 CET "
        "(Europe/Berlin)"
    )
    assert all(d.sent_at is not None and d.sent_at >= monday for d in lite.deliveries(job))


def test_not_after_expires_what_the_cap_held_back(smtp_sink: SmtpSink, lite: Store) -> None:
    settings = settings_for(smtp_sink)
    clock = FakeClock(T0)
    job = make_plan_job(lite, settings, 5, now=T0, per_hour=2, not_after="2027-01-15T09:30")
    result, events = run(lite, job, settings, clock)
    assert result.state == "completed"
    assert (result.counts.sent, result.counts.expired) == (2, 3)
    assert result.exit_code == ExitCode.SOME_FAILED  # expired: not delivered
    assert any(e.kind == "waiting" and "hourly cap 2/2" in e.error for e in events)
    assert len(smtp_sink.messages) == 2
    doc = job_document(lite.view(job), now=clock())
    assert doc["expired"] == 3 and doc["state"] == "completed"


# --------------------------------------------------------------------------- back-pressure


class ThrottlingHandler:
    """Accepts at most ``limit`` messages per 1 s window; beyond, RCPT gets 450 4.7.1."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.accepted: list[float] = []
        self.refused = 0
        self.lock = threading.Lock()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        window = int(time.time())
        with self.lock:
            if sum(1 for t in self.accepted if int(t) == window) >= self.limit:
                self.refused += 1
                return "450 4.7.1 too many messages, slow down"
            self.accepted.append(time.time())  # the slot is taken at RCPT
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK queued"


def test_smtp_throttling_slows_the_account_without_failing_or_pausing(lite: Store) -> None:
    handler = ThrottlingHandler(5)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=5.0)
    controller.start()
    try:
        sink = SmtpSink()
        sink.port = port
        settings = settings_for(sink)
        job = make_plan_job(lite, settings, 60, now=time.time())
        result = jobs.manager(lite, job, settings).run()
    finally:
        controller.stop()
    assert result.state == "completed" and result.counts.failed == 0
    assert result.counts.sent == 60 and result.exit_code == ExitCode.OK
    per_second = Counter(int(t) for t in handler.accepted)
    assert max(per_second.values()) <= 5
    assert handler.refused < 60  # it paused after refusals instead of hammering
    # a throttled attempt is given back: no delivery used up a retry
    assert {d.attempts for d in lite.deliveries(job)} == {1}


def test_mailtrap_429_with_retry_after_slows_the_account(
    httpserver: HTTPServer, lite: Store
) -> None:
    accepted: list[float] = []
    lock = threading.Lock()

    def handle(request: Request) -> Response:
        now = time.time()
        with lock:
            if sum(1 for t in accepted if t > now - 1.0) >= 15:
                body = json.dumps({"errors": ["Too many requests"]})
                return Response(body, 429, {"Retry-After": "1"}, mimetype="application/json")
            accepted.append(now)
            n = len(accepted)
        answer = json.dumps({"success": True, "message_ids": [f"m{n}"]})
        return Response(answer, 200, mimetype="application/json")

    httpserver.expect_request("/api/send", method="POST").respond_with_handler(handle)
    settings = Settings(
        provider="mailtrap",
        sender="Office <office@example.edu>",
        mailtrap=MailtrapSettings(
            token="tok", api_url=httpserver.url_for("/"), timeout=5.0, batch_size=1
        ),
    )
    Path("list.csv").write_text(
        "name,email\n" + "".join(f"N{i},p{i}@example.edu\n" for i in range(60))
    )
    Path("t.txt").write_text("Hello {{ name }}")
    plan = jobs.plan(
        jobs.SourceOptions(csv="list.csv", template="t.txt", subject="Reminder {{ name }}"),
        jobs.SendOptions(provider="mailtrap", rate=0.0),
        settings,
    )
    job = jobs.create_job(lite, plan)
    result = jobs.manager(lite, job, settings).run()
    assert result.state == "completed" and result.counts.failed == 0
    assert result.counts.sent == 60
    assert {d.attempts for d in lite.deliveries(job)} == {1}


def test_throttling_wording_is_classified() -> None:
    from bulkmail.providers.base import is_throttling

    assert is_throttling(450, "450 4.7.1 try later")
    assert is_throttling(421, "421 too many connections from your host")
    assert is_throttling(451, "451 rate limit exceeded")
    assert not is_throttling(450, "450 4.2.1 mailbox busy")
    assert not is_throttling(550, "550 5.7.1 rate limit")


# --------------------------------------------------------------------------- run-due


def test_send_reminders_not_before_schedules_and_run_due_starts_it(tmp_path: Path) -> None:
    Path("list.csv").write_text("name,email\nA,a@example.edu\nB,b@example.edu\n")
    Path("t.txt").write_text("Hello {{ name }}")
    common = ["--store", "jobs.db", "--config", "none.toml"]
    later = "2099-01-01T08:00"
    result = bulkmail(
        "send-reminders", "--csv", "list.csv", "--template", "t.txt", "--subject", "Hi",
        "--from", "office@example.edu", "--not-before", later, "--tz", "UTC", "--yes",
        "--store", "jobs.db",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "job 1 scheduled for 2099-01-01 08:00 UTC" in result.stdout
    assert "bulkmail run-due" in result.stdout
    quiet = bulkmail("run-due", *common[:2])
    assert quiet.exit_code == 0 and quiet.stdout == ""
    # its time has come (the store's not_before moved to the past, as cron would find it)
    with sqlite3.connect("jobs.db") as db:
        db.execute("UPDATE jobs SET not_before = ? WHERE id = 1", (time.time() - 60,))
    due = bulkmail("run-due", *common[:2])
    assert due.exit_code == 0, due.output
    assert due.stdout.startswith("job 1 started: worker pid")
    store = open_store("jobs.db")
    deadline = time.monotonic() + 30
    while store.get_job(1).state != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_job(1).state == "completed" and store.counts(1).sent == 2
    again = bulkmail("run-due", *common[:2])
    assert again.exit_code == 0 and again.stdout == ""
    store.close()


# --------------------------------------------------------------------------- schema 3


def test_a_store_of_schema_3_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_store(path).close()
    with sqlite3.connect(path) as db:  # back to what bulkmail wrote at schema 3
        for column in ("windows", "tz", "not_before", "not_after", "per_hour", "per_day",
                       "recheck_url", "recheck_query", "waiting_for", "waiting_until"):  # fmt: skip
            db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        db.execute("ALTER TABLE rate_buckets DROP COLUMN not_before")
        db.execute("ALTER TABLE rate_buckets DROP COLUMN factor")
        db.execute("DROP TABLE sends")
        for table in ("events", "suppressions", "processed"):  # schema 5's, not there either
            db.execute(f"DROP TABLE {table}")
        db.execute("DROP INDEX ix_deliveries_provider_message_id")
        db.execute("DROP TABLE api_tokens")  # schema 6's
        db.execute("ALTER TABLE jobs DROP COLUMN created_by")
        db.execute("ALTER TABLE jobs DROP COLUMN name")  # schema 7's
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store = open_store(path, create=False)
    job = store.create_job(
        replace(new_job(per_day=9), windows=("Mon 08:00-09:00",), tz="UTC"),
        people(1),
        now=T0,
        domain="x",
    )
    record = store.get_job(job)
    assert (record.per_day, record.windows, record.tz) == (9, ("Mon 08:00-09:00",), "UTC")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
        assert db.execute("SELECT count(*) FROM sends").fetchone() == (0,)
    store.close()
