"""``--recheck`` (issue 12, "Still due?") and ``--throttle-pause``: a real SQLite course
database (and a PostgreSQL one for the password), a real SMTP server on loopback, the send
loop with an injected clock; rows deleted from the course database while the job runs."""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url

from bulkmail import jobs
from bulkmail.config import Settings, load_settings
from bulkmail.errors import ExitCode
from bulkmail.manager import THROTTLE_PAUSE_AFTER, EmailManager, Event
from bulkmail.recheck import RECHECK_REASON, Recheck, runtime_url
from bulkmail.sources import open_db, query_addresses, recheck_location
from bulkmail.store import Store, open_store
from tests.e2e import assert_refused, build_course_db, bulkmail, default_store, smtp_env
from tests.smtp_sink import Rule, SmtpSink
from tests.test_manager import FakeClock, settings_for
from tests.test_sources import course_tables

SUBJECT = "Grades, {{ name }}"


@pytest.fixture
def lite(tmp_path: Path) -> Store:
    return open_store(tmp_path / "jobs.db")


def template() -> str:
    Path("t.txt").write_text("Dear {{ name }},\nplease submit your grades.\n", encoding="utf-8")
    return "t.txt"


def recheck_job(
    store: Store, settings: Settings, db: str, *, rate: float = 1 / 30, query: str | None = None
) -> int:
    plan = jobs.plan(
        jobs.SourceOptions(db=db, query=query, template=template(), subject=SUBJECT),
        jobs.SendOptions(provider=settings.provider_name, rate=rate, recheck=True),
        settings,
    )
    return jobs.create_job(store, plan)


def instructors(db: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(db)
    try:
        return [(int(i), str(e)) for i, e in conn.execute("SELECT id, email FROM instructors")]
    finally:
        conn.close()


def delete_instructors(db: Path, ids: list[int]) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany("DELETE FROM instructors WHERE id = ?", [(i,) for i in ids])
    finally:
        conn.close()


def manager(
    store: Store, job: int, settings: Settings, clock: FakeClock, on_event: Any = None, **kw: Any
) -> EmailManager:
    return EmailManager(
        store,
        job,
        provider_factory=jobs.provider_factory(settings),
        clock=clock,
        sleep=clock.sleep,
        on_event=on_event,
        **kw,
    )


def when_sent(n: int, action: Any) -> Any:
    """An on_event hook that runs ``action`` once, when the ``n``th message has been sent."""
    sent: list[str] = []

    def hook(event: Event) -> None:
        if event.kind == "sent":
            sent.append(event.email)
            if len(sent) == n:
                action()

    return hook


def received(sink: SmtpSink) -> list[str]:
    return [m.rcpt_tos[0] for m in sink.messages]


# --------------------------------------------------------------------------- the send loop


def test_instructors_deleted_mid_job_get_nothing_and_are_skipped_with_the_reason(
    smtp_sink: SmtpSink, lite: Store
) -> None:
    db = build_course_db().absolute()
    settings = settings_for(smtp_sink)
    job = recheck_job(lite, settings, "sqlite:///course.db")
    everyone = instructors(db)
    gone = [e for i, e in everyone if i in (5, 7, 9)]
    clock = FakeClock()
    start = clock.now
    mgr = manager(
        lite, job, settings, clock, when_sent(2, lambda: delete_instructors(db, [5, 7, 9]))
    )
    result = mgr.run()
    assert result.state == "completed" and result.exit_code == ExitCode.OK
    # at the server: the deleted instructors got nothing, everyone else one message
    got = received(smtp_sink)
    assert sorted(got) == sorted(e for _, e in everyone if e not in gone)
    skipped = {d.email: d for d in lite.deliveries(job) if d.state == "skipped"}
    assert sorted(skipped) == sorted(gone)
    assert {d.last_error for d in skipped.values()} == {RECHECK_REASON}
    assert (result.counts.sent, result.counts.skipped) == (9, 3)
    # once a minute at most: one query per started minute of the (fake) run
    assert mgr.recheck is not None
    assert 2 <= mgr.recheck.runs <= (clock.now - start) // 60 + 1
    # `status --skipped` shows why
    shown = bulkmail("status", str(job), "--skipped", "--json", "--store", str(lite.location))
    assert shown.exit_code == 0, shown.output
    skips = {s["email"]: s["reason"] for s in json.loads(shown.stdout)["skips"]}
    assert skips == dict.fromkeys(gone, RECHECK_REASON)


def test_the_query_runs_at_most_once_a_minute(lite: Store) -> None:
    build_course_db()
    job = recheck_job(lite, Settings(provider="outbox"), "sqlite:///course.db", rate=0)
    clock = FakeClock()
    asked: list[str] = []
    answers = [
        frozenset({"ada.whitfield@example.edu", "b.okafor@example.edu"}),
        frozenset({"ada.whitfield@example.edu"}),
        frozenset(),
    ]

    def run(url: str, query: str, timeout: float) -> frozenset[str]:
        asked.append(query)
        return answers[min(len(asked), len(answers)) - 1]

    check = Recheck(job, "sqlite:///course.db", "SELECT name, email FROM instructors",
                    clock=clock, run=run)  # fmt: skip
    assert check.check(lite) == 10  # all but two no longer returned
    clock.now += 59.0
    assert check.check(lite) == 0 and len(asked) == 1  # cached
    clock.now += 1.0
    assert check.check(lite) == 1 and len(asked) == 2  # a minute later: asked again
    clock.now -= 3600.0  # the clock went back: not stuck on a future answer
    assert check.check(lite) == 1 and len(asked) == 3
    assert lite.counts(job).skipped == 12 and lite.counts(job).pending == 0


def test_a_database_down_at_recheck_skips_nobody_and_the_job_goes_on(
    smtp_sink: SmtpSink, lite: Store, caplog: pytest.LogCaptureFixture
) -> None:
    db = build_course_db().absolute()
    settings = settings_for(smtp_sink)
    job = recheck_job(lite, settings, "sqlite:///course.db")

    def database_down() -> None:
        delete_instructors(db, [5, 7, 9])  # what it would say, if it could be asked
        db.rename(db.with_name("elsewhere.db"))

    clock = FakeClock()
    mgr = manager(lite, job, settings, clock, when_sent(2, database_down))
    with caplog.at_level(logging.WARNING, logger="bulkmail"):
        result = mgr.run()
    assert result.state == "completed" and result.exit_code == ExitCode.OK
    assert len(received(smtp_sink)) == 12 and result.counts.skipped == 0
    assert mgr.recheck is not None and mgr.recheck.runs >= 2
    warnings = [r.getMessage() for r in caplog.records if "--recheck" in r.getMessage()]
    assert warnings and all("nobody skipped" in w for w in warnings)
    assert "no such database file" in warnings[0]


def test_a_failing_first_query_skips_nobody(lite: Store) -> None:
    build_course_db()
    job = recheck_job(lite, Settings(provider="outbox"), "sqlite:///course.db", rate=0)

    def down(url: str, query: str, timeout: float) -> frozenset[str]:
        raise OSError("connection refused")

    check = Recheck(job, "sqlite:///course.db", "SELECT 1", clock=FakeClock(), run=down)
    assert check.check(lite) == 0 and check.returned is None
    assert lite.counts(job).pending == 12


def test_addresses_match_as_the_job_normalised_them(tmp_path: Path) -> None:
    db = tmp_path / "mixed.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute('CREATE TABLE people ("E-Mail" TEXT, name TEXT)')
        conn.executemany(
            "INSERT INTO people VALUES (?, ?)",
            [
                (" Ada@Example.EDU ", "Ada"),
                ("ben@bücher.example", "Ben"),
                ("zoë@bücher.example", "Zoë"),
                ("not an address", "x"),
            ],
        )
    conn.close()
    url, query = f"sqlite:///{db}", 'SELECT name, "E-Mail" FROM people'
    found = query_addresses(url, query)
    assert found == {
        "ada@example.edu",
        "ben@xn--bcher-kva.example",
        "zoë@bücher.example",
        "not an address",
    }
    # exactly the addresses a job made from it holds, as the store keys them
    assert found == {r.email.lower() for r in open_db(url, query)}


# --------------------------------------------------------------------------- the password


def test_the_password_is_never_stored_and_a_worker_without_it_pauses_the_job(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    course_tables(pg_url)  # trust authentication: the password is accepted, and ignored
    with_password = make_url(pg_url).set(password="s3cret-pw").render_as_string(False)
    result = bulkmail(
        "send-reminders", "--db", with_password, "--recheck", "--template", template(),
        "--subject", SUBJECT, "--yes", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"]) == ("completed", 12)  # this run had the password
    conn = sqlite3.connect(default_store())
    conn.row_factory = sqlite3.Row
    [row] = list(conn.execute("SELECT * FROM jobs"))
    conn.close()
    assert "s3cret" not in json.dumps(dict(row))
    assert row["recheck_url"] == make_url(with_password).render_as_string(hide_password=True)
    assert ":***@" in row["recheck_url"]
    assert row["recheck_query"] == "SELECT name, email FROM instructors"

    # a later worker without the password: one clear line, the job paused (nothing sent)
    store = open_store(tmp_path / "later.db")
    plan = jobs.plan(
        jobs.SourceOptions(db=with_password, template="t.txt", subject=SUBJECT),
        jobs.SendOptions(provider="outbox", recheck=True),
        Settings(),
    )
    job = jobs.create_job(store, plan)
    with caplog.at_level(logging.ERROR, logger="bulkmail"):
        run = jobs.manager(store, job, Settings()).run()
    assert run.state == "paused" and run.exit_code == ExitCode.STOPPED
    assert run.counts.pending == 12 and run.counts.sent == 0
    assert run.error is not None and "BULKMAIL_DB" in run.error and "\n" not in run.error
    assert [r.getMessage() for r in caplog.records if "--recheck" in r.getMessage()] == [
        f"job {job}: {run.error}"
    ]
    # ... and `resume` with BULKMAIL_DB naming that database sends
    resumed = bulkmail(
        "resume", str(job), "--json", "--store", str(tmp_path / "later.db"),
        env={"BULKMAIL_DB": with_password},
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["sent"] == 12

    # a job for later, which `run-due` starts: said at once when that worker lacks it
    later = [
        "send-reminders", "--db", with_password, "--recheck", "--template", "t.txt",
        "--subject", SUBJECT, "--not-before", "2099-01-01T08:00", "--yes",
    ]  # fmt: skip
    warned = bulkmail(*later)
    assert warned.exit_code == 0, warned.output
    [line] = [x for x in warned.stderr.splitlines() if "--recheck" in x]
    assert line.startswith("bulkmail: warning: --recheck:"), line
    assert "BULKMAIL_DB" in line and "s3cret" not in warned.output
    quiet = bulkmail(*later, env={"BULKMAIL_DB": with_password})
    assert quiet.exit_code == 0 and "--recheck" not in quiet.stderr


def test_runtime_url_needs_the_same_database_with_a_password() -> None:
    stored = "postgresql://ann:***@db.example.edu:5433/courses"
    right = "postgresql+psycopg://ann:pw@db.example.edu:5433/courses"
    assert runtime_url(stored, [None, "", "postgresql://ann:pw@db.example.edu/courses", right]) == (
        right
    )
    assert runtime_url(stored, ["postgresql://bob:pw@db.example.edu:5433/courses"]) is None
    assert runtime_url(stored, ["postgresql://ann@db.example.edu:5433/courses"]) is None
    plain = "postgresql://ann@db.example.edu/courses"  # no password then: none needed now
    assert runtime_url(plain, []) == plain


def test_a_sqlite_course_database_is_recorded_by_its_absolute_path(tmp_path: Path) -> None:
    assert recheck_location("sqlite:///course.db") == f"sqlite:///{tmp_path / 'course.db'}"
    assert recheck_location("postgresql://a:b@h/d") == "postgresql://a:***@h/d"


def test_a_password_in_the_query_string_is_not_recorded_either() -> None:
    """libpq also takes ``?password=``: the job records user:***@ instead, and a worker
    finds the URL with it as it finds one with user:password@ (found in review)."""
    given = "postgresql://ann@db.example.edu/courses?password=s3cret&sslmode=require"
    stored = recheck_location(given)
    assert "s3cret" not in stored
    assert stored == "postgresql://ann:***@db.example.edu/courses?sslmode=require"
    assert runtime_url(stored, ["postgresql://ann@db.example.edu/courses", given]) == given


# --------------------------------------------------------------------------- the command line


def test_recheck_with_a_csv_is_one_line_and_no_job() -> None:
    Path("list.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--csv", "list.csv", "--recheck", "--template", template(),
        "--subject", "Hi", "--yes",
    )  # fmt: skip
    assert_refused(result, "--recheck", "--db URL")


def test_throttle_pause_reaches_the_worker_and_pauses_the_job(smtp_sink: SmtpSink) -> None:
    Path("list.csv").write_text(
        "name,email\nAda,ada@example.edu\nBen,ben@example.edu\n", encoding="utf-8"
    )
    for address in ("ada@example.edu", "ben@example.edu"):
        smtp_sink.replies[address] = Rule("450 4.7.1 slow down")
    result = bulkmail(
        "send-reminders", "--csv", "list.csv", "--template", template(), "--subject", "Hi",
        "--provider", "smtp", "--from", "office@example.edu", "--rate", "0", "--yes",
        "--throttle-pause", "0.2", "--json",
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert result.exit_code == ExitCode.STOPPED, result.output
    doc = json.loads(result.stdout)
    assert doc["state"] == "paused" and doc["sent"] == 0
    assert "throttled by the server: nothing got through for 0.2 s" in doc["error"]
    assert smtp_sink.messages == []


def test_throttle_pause_from_flag_environment_and_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "bulkmail.toml"
    config.write_text("[defaults]\nthrottle_pause = 120\n", encoding="utf-8")
    config.chmod(0o600)
    assert load_settings(env={}).throttle_pause is None
    assert load_settings(config=str(config), env={}).throttle_pause == 120.0
    env = {"BULKMAIL_THROTTLE_PAUSE": "30"}
    settings = load_settings(config=str(config), env=env)
    assert settings.throttle_pause == 30.0
    assert jobs.with_throttle_pause(settings, 5.0).throttle_pause == 5.0
    store = open_store(tmp_path / "jobs.db")
    assert jobs.manager(store, 1, Settings()).throttle_pause == THROTTLE_PAUSE_AFTER
    assert jobs.manager(store, 1, replace(Settings(), throttle_pause=7.0)).throttle_pause == 7.0
    # a detached worker (and run-due's) gets it, and the URL, through its environment
    assert jobs.worker_env(replace(Settings(), throttle_pause=7.0), "sqlite:///c.db") == {
        "BULKMAIL_THROTTLE_PAUSE": "7.0",
        "BULKMAIL_DB": "sqlite:///c.db",
    }
    bad = bulkmail("run-due", "--throttle-pause", "0")
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0
    assert "--throttle-pause" in bad.stderr
    bad_env = bulkmail("run-due", env={"BULKMAIL_THROTTLE_PAUSE": "-1"})
    assert bad_env.exit_code == 2 and "BULKMAIL_THROTTLE_PAUSE" in bad_env.stderr
