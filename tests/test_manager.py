"""The send loop against a real SMTP server on loopback, with an injected clock: reply
classes, retries with backoff, in-doubt resends, fatal errors, pausing, cancelling."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from bulkmail import jobs
from bulkmail.config import Settings, SmtpSettings
from bulkmail.errors import ExitCode
from bulkmail.manager import EmailManager, Event, backoff_delay
from bulkmail.store import Store, open_store
from tests.smtp_sink import Rule, SmtpSink


class FakeClock:
    """POSIX time that only moves when the code under test sleeps."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> bool:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds
        return False


def settings_for(sink: SmtpSink, **smtp: object) -> Settings:
    base = SmtpSettings(host=sink.host, port=sink.port, security="none", timeout=5.0)
    return Settings(
        provider="smtp",
        sender="Office <office@example.edu>",
        smtp=replace(base, **smtp),  # type: ignore[arg-type]
    )


def make_job(
    store: Store,
    settings: Settings,
    emails: list[str],
    *,
    rate: float = 0.0,
    max_retries: int = 3,
    backoff: float = 5.0,
    concurrency: int = 1,
) -> int:
    csv = Path("list.csv")
    csv.write_text("name,email\n" + "".join(f"N{i},{e}\n" for i, e in enumerate(emails)))
    Path("t.txt").write_text("Hello {{ name }}")
    plan = jobs.plan(
        jobs.SourceOptions(csv=str(csv), template="t.txt", subject="Reminder for {{ name }}"),
        jobs.SendOptions(
            provider="smtp",
            rate=rate,
            max_retries=max_retries,
            backoff=backoff,
            concurrency=concurrency,
        ),
        settings,
    )
    return jobs.create_job(store, plan)


def run(
    store: Store, job_id: int, settings: Settings, clock: FakeClock, **kw: object
) -> tuple[EmailManager, object]:
    events: list[Event] = []
    mgr = EmailManager(
        store,
        job_id,
        provider_factory=jobs.provider_factory(settings),
        clock=clock,
        sleep=clock.sleep,
        on_event=events.append,
        **kw,  # type: ignore[arg-type]
    )
    return mgr, mgr.run()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "jobs.db")


def received(sink: SmtpSink) -> list[str]:
    return [m.rcpt_tos[0] for m in sink.messages]


@pytest.mark.parametrize("code", ["421 4.4.2 closing", "450 4.2.1 busy", "451 4.3.0 later",
                                  "452 4.3.1 full"])  # fmt: skip
def test_transient_replies_are_retried_then_sent(
    smtp_sink: SmtpSink, store: Store, code: str
) -> None:
    settings = settings_for(smtp_sink)
    smtp_sink.replies["b@example.edu"] = Rule(code, times=2)
    job = make_job(store, settings, ["a@example.edu", "b@example.edu", "c@example.edu"])
    clock = FakeClock()
    _, result = run(store, job, settings, clock)
    assert result.state == "completed" and result.exit_code == ExitCode.OK  # type: ignore[attr-defined]
    assert sorted(received(smtp_sink)) == ["a@example.edu", "b@example.edu", "c@example.edu"]
    # c was not held up behind b's retries: it arrived before b finally did
    assert received(smtp_sink).index("c@example.edu") < received(smtp_sink).index("b@example.edu")
    b = next(d for d in store.deliveries(job) if d.email == "b@example.edu")
    assert b.attempts == 3 and b.state == "sent"
    # exponential backoff from 5 s: the loop waited 5 then 10 (fake) seconds for b
    assert sum(clock.slept) == pytest.approx(15.0)


@pytest.mark.parametrize("code", ["550 5.1.1 no such user", "552 5.2.2 mailbox full",
                                  "553 5.1.3 bad address", "554 5.7.1 rejected"])  # fmt: skip
def test_permanent_replies_fail_once_with_the_server_text(
    smtp_sink: SmtpSink, store: Store, code: str
) -> None:
    settings = settings_for(smtp_sink)
    smtp_sink.replies["b@example.edu"] = code
    job = make_job(store, settings, ["a@example.edu", "b@example.edu", "c@example.edu"])
    _, result = run(store, job, settings, FakeClock())
    assert result.state == "completed" and result.exit_code == ExitCode.SOME_FAILED  # type: ignore[attr-defined]
    b = next(d for d in store.deliveries(job) if d.email == "b@example.edu")
    assert (b.state, b.attempts) == ("failed", 1)
    assert b.last_error is not None and code in b.last_error
    assert sorted(received(smtp_sink)) == ["a@example.edu", "c@example.edu"]


def test_permanent_reply_at_data_also_fails_once(smtp_sink: SmtpSink, store: Store) -> None:
    settings = settings_for(smtp_sink)
    smtp_sink.replies["b@example.edu"] = Rule("554 5.6.0 content rejected", at="data")
    job = make_job(store, settings, ["a@example.edu", "b@example.edu"])
    run(store, job, settings, FakeClock())
    b = next(d for d in store.deliveries(job) if d.email == "b@example.edu")
    assert (b.state, b.attempts) == ("failed", 1) and "554" in (b.last_error or "")


def test_connection_dropped_after_data_is_resent_with_the_same_message_id(
    smtp_sink: SmtpSink, store: Store
) -> None:
    settings = settings_for(smtp_sink)
    smtp_sink.replies["b@example.edu"] = Rule(drop=True, times=1)
    job = make_job(store, settings, ["a@example.edu", "b@example.edu", "c@example.edu"])
    _, result = run(store, job, settings, FakeClock())
    assert result.state == "completed"  # type: ignore[attr-defined]
    to_b = [m.parse() for m in smtp_sink.messages if m.rcpt_tos == ["b@example.edu"]]
    assert len(to_b) == 2  # the server kept the first copy: one duplicate, same id
    assert to_b[0]["Message-ID"] == to_b[1]["Message-ID"]
    b = next(d for d in store.deliveries(job) if d.email == "b@example.edu")
    assert b.in_doubt and b.state == "sent"
    assert store.counts(job).in_doubt == 1


def test_retries_exhausted_become_failed(smtp_sink: SmtpSink, store: Store) -> None:
    settings = settings_for(smtp_sink)
    smtp_sink.replies["b@example.edu"] = "451 4.3.0 later"
    job = make_job(store, settings, ["a@example.edu", "b@example.edu"], max_retries=2)
    clock = FakeClock()
    _, result = run(store, job, settings, clock)
    b = next(d for d in store.deliveries(job) if d.email == "b@example.edu")
    assert (b.state, b.attempts) == ("failed", 3)
    assert (b.last_error or "").startswith("gave up after 3 attempts: 451")
    assert result.exit_code == ExitCode.SOME_FAILED  # type: ignore[attr-defined]


def test_bad_login_aborts_with_nothing_failed(store: Store) -> None:
    with SmtpSink(auth=("office", "right")) as sink:
        settings = settings_for(sink, username="office", password="wrong")
        job = make_job(store, settings, ["a@example.edu", "b@example.edu"])
        _, result = run(store, job, settings, FakeClock())
        assert sink.messages == []
        port = sink.port
    assert result.state == "aborted" and result.exit_code == ExitCode.STOPPED  # type: ignore[attr-defined]
    assert "535" in (result.error or "")  # type: ignore[attr-defined]
    counts = store.counts(job)
    assert (counts.pending, counts.failed, counts.sending) == (2, 0, 0)
    assert all(d.attempts == 0 for d in store.deliveries(job))
    # fixed credentials: resume (the job keeps its host and port) sends everything
    with SmtpSink(port=port, auth=("office", "right")) as sink:
        good = settings_for(sink, username="office", password="right")
        _, again = run(store, job, good, FakeClock())
        assert again.state == "completed"  # type: ignore[attr-defined]
        assert sorted(received(sink)) == ["a@example.edu", "b@example.edu"]


def test_ten_consecutive_transient_failures_pause_the_job(
    smtp_sink: SmtpSink, store: Store
) -> None:
    settings = settings_for(smtp_sink)
    emails = [f"p{i}@example.edu" for i in range(15)]
    for e in emails:
        smtp_sink.replies[e] = "451 4.3.0 server busy"
    job = make_job(store, settings, emails)
    _, result = run(store, job, settings, FakeClock())
    assert result.state == "paused" and result.exit_code == ExitCode.STOPPED  # type: ignore[attr-defined]
    assert "10 consecutive transient failures" in (result.error or "")  # type: ignore[attr-defined]
    counts = store.counts(job)
    assert counts.failed == 0 and counts.pending == 15
    # each recipient burnt at most one attempt, not its whole retry budget
    assert max(d.attempts for d in store.deliveries(job)) == 1


def test_server_down_pauses_instead_of_failing_everyone(store: Store) -> None:
    from tests.smtp_sink import free_port

    settings = Settings(
        provider="smtp",
        sender="office@example.edu",
        smtp=SmtpSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2.0),
    )
    emails = [f"p{i}@example.edu" for i in range(12)]
    csv = Path("list.csv")
    csv.write_text("email\n" + "\n".join(emails) + "\n")
    Path("t.txt").write_text("Hello")
    plan = jobs.plan(
        jobs.SourceOptions(csv=str(csv), template="t.txt", subject="x"),
        jobs.SendOptions(provider="smtp", rate=0),
        settings,
    )
    job = jobs.create_job(store, plan)
    _, result = run(store, job, settings, FakeClock())
    assert result.state == "paused"  # type: ignore[attr-defined]
    assert store.counts(job).failed == 0
    # nobody was tried, so nobody's retries are spent: resuming while the server is still
    # down pauses again and still fails no one
    _, again = run(store, job, settings, FakeClock())
    assert again.state == "paused"  # type: ignore[attr-defined]
    assert store.counts(job).failed == 0
    assert {d.attempts for d in store.deliveries(job)} == {0}


def test_cancel_from_another_terminal_stops_before_the_next_message(
    smtp_sink: SmtpSink, store: Store
) -> None:
    settings = settings_for(smtp_sink)
    emails = [f"p{i}@example.edu" for i in range(6)]
    job = make_job(store, settings, emails)
    other = open_store(store.location)  # the other terminal's own connection

    def on_event(event: Event) -> None:
        if event.kind == "sent" and event.email == "p1@example.edu":
            other.cancel(job, now=0.0)

    clock = FakeClock()
    mgr = EmailManager(store, job, provider_factory=jobs.provider_factory(settings),
                       clock=clock, sleep=clock.sleep, on_event=on_event)  # fmt: skip
    result = mgr.run()
    assert result.state == "cancelled" and result.exit_code == ExitCode.STOPPED
    counts = store.counts(job)
    assert (counts.sent, counts.cancelled, counts.pending) == (2, 4, 0)
    assert received(smtp_sink) == ["p0@example.edu", "p1@example.edu"]


def test_resume_of_a_finished_job_sends_nothing(smtp_sink: SmtpSink, store: Store) -> None:
    settings = settings_for(smtp_sink)
    job = make_job(store, settings, ["a@example.edu"])
    run(store, job, settings, FakeClock())
    from bulkmail.errors import JobStateError

    with pytest.raises(JobStateError, match="completed"):
        run(store, job, settings, FakeClock())
    assert len(smtp_sink.messages) == 1


def test_concurrency_sends_each_recipient_once(smtp_sink: SmtpSink, store: Store) -> None:
    settings = settings_for(smtp_sink)
    emails = [f"p{i}@example.edu" for i in range(40)]
    job = make_job(store, settings, emails, concurrency=4)
    mgr = EmailManager(store, job, provider_factory=jobs.provider_factory(settings))
    result = mgr.run()
    assert result.state == "completed"
    assert sorted(received(smtp_sink)) == sorted(emails)
    assert 1 <= smtp_sink.connections <= 4  # one connection per sending thread, at most


def test_backoff_delays() -> None:
    assert [backoff_delay(n, 5.0) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert backoff_delay(2, 5.0, retry_after=42.0) == 42.0
    assert backoff_delay(1, 0.0) == 0.0
    # doubling stops at one day, however many attempts (no overflow on huge counts)
    assert backoff_delay(20, 5.0) == backoff_delay(10_000, 5.0) == 24 * 3600.0
