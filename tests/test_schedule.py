"""The calendar (bulkmail.schedule): windows, zones, caps and the finishing estimate, with
fixed datetimes (no clock, no waits); then the dry run and the prompt that show it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from bulkmail.cli import app
from bulkmail.cli.env import Environment, use
from bulkmail.errors import InputError
from bulkmail.ratelimit import gcra_reserve
from bulkmail.schedule import (
    DAY,
    HOUR,
    Schedule,
    Window,
    describe,
    local_zone,
    parse_when,
    parse_window,
    parse_windows,
    parse_zone,
    plan_calendar,
    timing,
    warning,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
OFFICE = '"Mon-Fri 08:00-18:00"'


def at(tz: tzinfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> float:  # fmt: skip
    return datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()


def local(t: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(t, tz)


def office(tz: ZoneInfo = BERLIN) -> Schedule:
    return Schedule(parse_windows(["Mon-Fri 08:00-18:00"]), tz)


def most_in_any(times: Sequence[float], span: float) -> int:
    """The largest number of sends in any window (t - span, t]."""
    most, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - span:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [
        ("Mon-Fri 08:00-18:00", {0, 1, 2, 3, 4}, 480, 1080),
        ("Mon,Wed,Fri 9:00-12:30", {0, 2, 4}, 540, 750),
        ("Sat-Sun 10:00-14:00", {5, 6}, 600, 840),
        ("daily 00:00-24:00", set(range(7)), 0, 1440),
        ("* 06:00-07:00", set(range(7)), 360, 420),
        ("08:00-18:00", set(range(7)), 480, 1080),
        ("fri-mon 08:00-09:00", {4, 5, 6, 0}, 480, 540),
        ("Monday,tue 08:00-09:00", {0, 1}, 480, 540),
    ],
)
def test_windows_parse(text: str, days: set[int], start: int, end: int) -> None:
    assert parse_window(text) == (Window(frozenset(days), start, end),)


def test_a_window_across_midnight_runs_into_the_next_day() -> None:
    evening, morning = parse_window("Fri 22:00-02:00")
    assert evening == Window(frozenset({4}), 22 * 60, 1440)
    assert morning == Window(frozenset({5}), 0, 120)
    sunday = parse_window("Sun 22:00-00:00")  # to midnight: no morning part
    assert sunday == (Window(frozenset({6}), 22 * 60, 1440),)
    s = Schedule(parse_window("Fri 22:00-02:00"), BERLIN)
    assert s.is_open(at(BERLIN, 2026, 12, 5, 1, 59))  # Saturday 01:59
    assert not s.is_open(at(BERLIN, 2026, 12, 5, 2, 0))
    assert s.window_end(at(BERLIN, 2026, 12, 4, 23, 0)) == at(BERLIN, 2026, 12, 5, 2, 0)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Mon-Fry 08:00-18:00", "unknown day 'Fry'"),
        ("Mon-Fri 8-18", "not a time HH:MM"),
        ("Mon-Fri 08:00-25:00", "not a time of day"),
        ("Mon-Fri 08:00", "not a span of time"),
        ("Mon-Fri 08:00-08:00", "a whole day is 00:00-24:00"),
        ("Mon-Fri 24:00-08:00", "not a time of day"),
        ("Mon Fri 08:00-18:00", "expected DAYS HH:MM-HH:MM"),
        ("Mon,,Fri 08:00-18:00", "empty day"),
        ("", "expected DAYS HH:MM-HH:MM"),
    ],
)
def test_a_bad_window_names_the_value_and_shows_an_example(text: str, why: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_window(text)
    message = caught.value.message
    assert message.startswith(f"--window: {text!r}")
    assert why in message and 'example: --window "Mon-Fri 08:00-18:00"' in message


def test_zones() -> None:
    assert parse_zone("Europe/Berlin") == BERLIN
    for bad in ("Mars/Olympus", "../etc/passwd", "Europe/"):
        with pytest.raises(InputError, match="--tz: unknown time zone"):
            parse_zone(bad)
    assert local_zone({"TZ": "America/New_York"}) == NEW_YORK
    assert local_zone({"TZ": ":Europe/Berlin"}) == BERLIN
    assert parse_zone(None) is not None  # the machine's zone, whatever it is


def test_dates_and_times_are_iso_8601_naive_in_the_zone() -> None:
    assert parse_when("2026-12-01T08:00", BERLIN, "--not-before") == at(BERLIN, 2026, 12, 1, 8)
    assert parse_when("2026-12-01 08:00:00+00:00", BERLIN, "--not-before") == at(
        UTC, 2026, 12, 1, 8
    )
    assert parse_when("2026-12-01T08:00Z", NEW_YORK, "--x") == at(UTC, 2026, 12, 1, 8)
    assert parse_when("2026-12-04", BERLIN, "--not-before") == at(BERLIN, 2026, 12, 4)
    # a bare --not-after date includes that day
    assert parse_when("2026-12-04", BERLIN, "--not-after", end_of_day=True) == at(
        BERLIN, 2026, 12, 5
    )
    with pytest.raises(InputError, match=r"--not-before: 'next week' is not an ISO 8601"):
        parse_when("next week", BERLIN, "--not-before")


def test_timing_checks_the_span_and_the_caps() -> None:
    now = at(BERLIN, 2026, 12, 1, 12)
    t = timing(
        windows=["Mon-Fri 08:00-18:00"],
        tz="Europe/Berlin",
        not_before="2026-12-02T08:00",
        not_after="2026-12-04T17:00",
        per_day=150,
        now=now,
    )
    assert t.active and t.tz == BERLIN and t.per_day == 150 and t.per_hour is None
    assert t.not_before == at(BERLIN, 2026, 12, 2, 8) and t.not_after == at(BERLIN, 2026, 12, 4, 17)
    assert not timing(tz="Europe/Berlin", now=now).active  # a zone alone changes nothing
    with pytest.raises(InputError, match="--not-after 2026-12-01T11:00 is in the past"):
        timing(not_after="2026-12-01T11:00", tz="Europe/Berlin", now=now)
    with pytest.raises(InputError, match="is not after --not-before"):
        timing(not_before="2026-12-03", not_after="2026-12-02T09:00", tz="UTC", now=now)
    for bad in (0, -5):
        with pytest.raises(InputError, match=f"--per-hour: must be a positive.*got {bad}"):
            timing(per_hour=bad, now=now)


# --------------------------------------------------------------------------- windows and DST


def test_office_hours_through_a_week_with_a_weekend() -> None:
    s = office()
    friday_evening = at(BERLIN, 2026, 12, 4, 18, 0)
    assert not s.is_open(friday_evening)  # the end is not in the window
    assert s.is_open(at(BERLIN, 2026, 12, 4, 17, 59, 59))
    assert s.next_open(friday_evening) == at(BERLIN, 2026, 12, 7, 8)  # Monday
    assert s.next_open(at(BERLIN, 2026, 12, 5, 12)) == at(BERLIN, 2026, 12, 7, 8)
    monday = at(BERLIN, 2026, 12, 7, 8)
    assert s.is_open(monday) and s.next_open(monday) == monday
    assert s.window_end(monday) == at(BERLIN, 2026, 12, 7, 18)
    assert s.window_end(friday_evening) == friday_evening  # closed: nothing to end
    # aware datetimes in any zone work the same
    assert s.next_open(datetime(2026, 12, 4, 17, 0, tzinfo=UTC)) == at(BERLIN, 2026, 12, 7, 8)
    with pytest.raises(ValueError, match="naive"):
        s.is_open(datetime(2026, 12, 4, 17, 0))


def test_berlin_daylight_saving_changes_keep_local_hours() -> None:
    s = Schedule(parse_windows(["daily 08:00-18:00"]), BERLIN)
    # spring forward, Sunday 29 March 2026: 08:00 is 07:00 UTC on Saturday, 06:00 on Sunday
    saturday_night = at(BERLIN, 2026, 3, 28, 20)
    assert s.next_open(saturday_night) == datetime(2026, 3, 29, 6, tzinfo=UTC).timestamp()
    assert (
        s.window_end(s.next_open(saturday_night))
        == datetime(2026, 3, 29, 16, tzinfo=UTC).timestamp()
    )
    # fall back, Sunday 25 October 2026: a whole Sunday is 25 hours long
    sunday = Schedule(parse_windows(["Sun 00:00-24:00"]), BERLIN)
    start = at(BERLIN, 2026, 10, 25)
    assert sunday.window_end(start) - start == 25 * HOUR
    # and a window in the repeated hour holds both of its hours
    night = Schedule(parse_windows(["Sun 02:00-03:00"]), BERLIN)
    opens = night.next_open(at(BERLIN, 2026, 10, 24, 12))
    assert night.window_end(opens) - opens == 2 * HOUR


def test_new_york_fall_back_over_a_weekend() -> None:
    s = office(NEW_YORK)
    friday_evening = at(NEW_YORK, 2026, 10, 30, 18, 30)  # EDT, UTC-4
    monday = s.next_open(friday_evening)  # after the change to EST, UTC-5
    assert monday == datetime(2026, 11, 2, 13, tzinfo=UTC).timestamp()
    assert local(monday, NEW_YORK).hour == 8
    assert (
        s.next_open(at(NEW_YORK, 2026, 10, 30, 7))
        == datetime(2026, 10, 30, 12, tzinfo=UTC).timestamp()
    )
    # spring forward, Sunday 8 March 2026: Monday's window is 12:00-22:00 UTC
    spring = s.next_open(at(NEW_YORK, 2026, 3, 7, 12))
    assert spring == datetime(2026, 3, 9, 12, tzinfo=UTC).timestamp()


def test_windows_that_touch_are_one_stretch_and_always_open_never_ends() -> None:
    s = Schedule(parse_windows(["Mon 08:00-12:00", "Mon 12:00-14:00", "Mon 13:00-15:00"]), BERLIN)
    monday = at(BERLIN, 2026, 11, 30, 9)
    assert s.window_end(monday) == at(BERLIN, 2026, 11, 30, 15)
    always = Schedule(parse_windows(["daily 00:00-24:00"]), BERLIN)
    assert always.is_open(monday) and math.isinf(always.window_end(monday))
    nothing = Schedule(tz=BERLIN)
    assert nothing.always_open and nothing.next_open(monday) == monday
    week = Schedule(parse_windows(["Mon-Fri 00:00-24:00"]), BERLIN)
    assert week.window_end(monday) == at(BERLIN, 2026, 12, 5)  # Saturday 00:00


# --------------------------------------------------------------------------- the calendar


def test_per_day_150_with_1000_messages_over_office_weeks() -> None:
    monday_early = at(BERLIN, 2026, 11, 30, 7)
    cal = plan_calendar(1000, start=monday_early, per_day=150, schedule=office(), keep_times=True)
    assert [(d.date, d.count) for d in cal.days] == [
        (date(2026, 11, 30), 150),
        (date(2026, 12, 1), 150),
        (date(2026, 12, 2), 150),
        (date(2026, 12, 3), 150),
        (date(2026, 12, 4), 150),
        (date(2026, 12, 7), 150),  # the weekend skipped
        (date(2026, 12, 8), 100),
    ]
    assert cal.starts_at == at(BERLIN, 2026, 11, 30, 8)
    assert cal.finishes_at == at(BERLIN, 2026, 12, 8, 8)
    assert cal.expiring == 0 and cal.sent == 1000 and len(cal.times) == 1000
    assert most_in_any(cal.times, DAY) == 150
    assert all(office().is_open(t) for t in cal.times)
    text = describe(cal)
    assert text.startswith("starts today 08:00: 150 today until 18:00, 150 Tue, 150 Wed")
    assert text.endswith("100 Tue 8 Dec; done about Tue 8 Dec 08:00 CET")


def test_the_text_of_the_issue() -> None:
    monday = at(BERLIN, 2026, 11, 30, 9)
    cal = plan_calendar(
        342, start=monday, rate=1 / 17.5, per_day=150, schedule=office(), now=monday
    )
    assert describe(cal) == "150 today until 18:00, 150 Tue, 42 Wed; done about Wed 09:12 CET"
    assert warning(cal) is None


def test_not_after_leaves_the_rest_to_expire() -> None:
    monday = at(BERLIN, 2026, 11, 30, 9)
    deadline = at(BERLIN, 2026, 12, 4, 17)
    cal = plan_calendar(
        1000, start=monday, per_day=150, schedule=office(), not_after=deadline, keep_times=True
    )
    assert cal.sent == 750 and cal.expiring == 250
    assert max(cal.times) < deadline
    assert warning(cal) == "cannot finish before --not-after 2026-12-04 17:00 CET: 250 would expire"
    # when nothing can go out in time
    late = plan_calendar(
        10, start=at(BERLIN, 2026, 12, 5, 9), schedule=office(), not_after=at(BERLIN, 2026, 12, 6)
    )
    assert late.days == () and late.expiring == 10 and late.finishes_at is None
    assert describe(late) == "nothing can go out before --not-after"
    assert warning(late) is not None and "10 would expire" in warning(late)  # type: ignore[operator]


def test_per_hour_and_per_day_together() -> None:
    start = at(UTC, 2026, 12, 1, 6)
    cal = plan_calendar(250, start=start, per_hour=30, per_day=100, keep_times=True)
    assert most_in_any(cal.times, HOUR) == 30 and most_in_any(cal.times, DAY) == 100
    # 30 an hour for three hours, 10 more in the fourth: then the day is full
    assert [cal.times.count(start + h * HOUR) for h in range(4)] == [30, 30, 30, 10]
    assert cal.times[100] == start + DAY
    assert [d.count for d in cal.days] == [100, 100, 50]
    assert cal.finishes_at == start + 2 * DAY + HOUR


def test_the_rate_binds_exactly_as_the_limiter_does() -> None:
    start = at(UTC, 2026, 12, 1, 9)
    for rate, burst in ((0.1, 1), (0.1, 5), (2.0, 3)):
        cal = plan_calendar(100, start=start, rate=rate, burst=burst, keep_times=True)
        tat: float | None = None
        expected = []
        now = start
        for _ in range(100):
            slot, tat = gcra_reserve(tat, now, rate, burst)
            expected.append(slot)
            now = slot
        assert cal.times == pytest.approx(expected)
    cal = plan_calendar(100, start=start, rate=0.1)
    assert cal.finishes_at == pytest.approx(start + 990)


def test_rate_and_hourly_cap_and_windows_all_hold() -> None:
    monday = at(NEW_YORK, 2026, 10, 30, 16)  # Friday 16:00, two hours before the weekend
    cal = plan_calendar(
        900, start=monday, rate=1.0, burst=10, per_hour=200, schedule=office(NEW_YORK),
        keep_times=True,
    )  # fmt: skip
    times = cal.times
    assert len(times) == 900 and most_in_any(times, HOUR) == 200
    assert all(b - a >= 0 for a, b in pairwise(times))
    assert all(office(NEW_YORK).is_open(t) for t in times)
    assert [d.count for d in cal.days] == [400, 500]  # Fri 16-18, then Monday (EST now)
    assert cal.days[1].date == date(2026, 11, 2)
    assert local(cal.days[1].first, NEW_YORK).hour == 8
    # within any 10 s no more than the burst plus the rate allows
    assert most_in_any(times, 10.0) <= 10 + 10


def test_history_counts_towards_the_rolling_caps() -> None:
    start = at(UTC, 2026, 12, 1, 12)
    history = [start - HOUR] * 100 + [start - 2 * DAY] * 50  # the old ones are out of it
    cal = plan_calendar(80, start=start, per_day=150, history=history, keep_times=True)
    assert cal.times.count(start) == 50
    assert cal.times[50:] == (start - HOUR + DAY,) * 30


def test_100000_messages_are_fast() -> None:
    monday = at(BERLIN, 2026, 11, 30, 7)
    for kwargs in (
        {"per_day": 150, "per_hour": 40, "schedule": office()},
        {"rate": 0.2, "burst": 10, "per_hour": 500},
        {"rate": 5.0, "per_day": 20000, "schedule": office()},
    ):
        began = time.perf_counter()
        cal = plan_calendar(100_000, start=monday, **kwargs)
        assert cal.sent == 100_000
        assert time.perf_counter() - began < 10  # well under a second unloaded


def test_a_long_calendar_is_shortened_and_a_later_one_names_its_first_day() -> None:
    now = at(BERLIN, 2026, 11, 30, 7)
    cal = plan_calendar(
        1000, start=at(BERLIN, 2027, 1, 4, 7), per_day=150, schedule=office(), now=now
    )
    assert describe(cal) == (
        "starts Mon 4 Jan 2027 08:00: 150 Mon 4 Jan 2027, 150 Tue, 150 Wed, 150 Thu, "
        "... (7 days), 100 Tue 12 Jan; done about Tue 12 Jan 08:00 CET"
    )


# --------------------------------------------------------------------------- CLI


def bulkmail(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def thousand(tmp_path: Path) -> list[str]:
    rows = "".join(f"P{i},p{i}@example.edu\n" for i in range(1000))
    (tmp_path / "list.csv").write_text("name,email\n" + rows, encoding="utf-8")
    (tmp_path / "t.txt").write_text("Hi {{ name }}", encoding="utf-8")
    return ["send-reminders", "--csv", "list.csv", "--template", "t.txt", "--subject", "x",
            "--store", str(tmp_path / "s.db")]  # fmt: skip


# a Monday far enough ahead that the test never meets it
LATER = ["--tz", "Europe/Berlin", "--not-before", "2030-12-02T07:00"]


def test_the_dry_run_shows_the_calendar(thousand: list[str], tmp_path: Path) -> None:
    args = [*thousand, "--per-day", "150", "--window", "Mon-Fri 08:00-18:00", *LATER]
    result = bulkmail(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    cal = json.loads(result.stdout)["calendar"]
    assert cal["days"] == [
        {"date": d, "count": n}
        for d, n in (("2030-12-02", 150), ("2030-12-03", 150), ("2030-12-04", 150),
                     ("2030-12-05", 150), ("2030-12-06", 150), ("2030-12-09", 150),
                     ("2030-12-10", 100))
    ]  # fmt: skip
    assert cal["finishes_at"] == "2030-12-10T07:00:00Z" and cal["expiring"] == 0
    assert cal["tz"] == "Europe/Berlin" and cal["starts_at"] == "2030-12-02T07:00:00Z"
    text = bulkmail(*args, "--not-after", "2030-12-06T12:00", "--dry-run")
    assert text.exit_code == 0, text.output
    out = " ".join(text.stdout.split())
    assert "calendar: starts Mon 2 Dec 2030 08:00: 150 Mon 2 Dec 2030, 150 Tue" in out
    assert "cannot finish before --not-after 2030-12-06 12:00 CET: 250 would expire" in out
    assert not (tmp_path / "s.db").exists()
    plain = json.loads(bulkmail(*thousand, "--dry-run", "--json").stdout)
    assert plain["calendar"] is None  # nothing asked for, nothing shown


def test_caps_come_from_the_environment_and_the_providers_section(
    thousand: list[str], tmp_path: Path
) -> None:
    # 07:00 CET is 06:00 UTC: 400 then, 400 at 07:00 UTC, 200 at 08:00 UTC
    env_cap = bulkmail(*thousand, *LATER, "--dry-run", "--json", env={"BULKMAIL_PER_HOUR": "400"})
    assert env_cap.exit_code == 0, env_cap.output
    assert [d["count"] for d in json.loads(env_cap.stdout)["calendar"]["days"]] == [1000]
    assert json.loads(env_cap.stdout)["calendar"]["finishes_at"] == "2030-12-02T08:00:00Z"
    (tmp_path / "bulkmail.toml").write_text("[outbox]\nper_day = 600\n", encoding="utf-8")
    config = bulkmail(*thousand, *LATER, "--dry-run", "--json", "--config", "bulkmail.toml")
    assert config.exit_code == 0, config.output
    assert [d["count"] for d in json.loads(config.stdout)["calendar"]["days"]] == [600, 400]
    flag = bulkmail(*thousand, *LATER, "--per-day", "500", "--dry-run", "--json",
                    "--config", "bulkmail.toml")  # fmt: skip
    assert [d["count"] for d in json.loads(flag.stdout)["calendar"]["days"]] == [500, 500]
    (tmp_path / "bulkmail.toml").write_text("[outbox]\nper_day = -1\n", encoding="utf-8")
    bad = bulkmail(*thousand, "--dry-run", "--config", "bulkmail.toml")
    assert bad.exit_code == 2 and "per_day ([outbox] in the config file" in bad.stderr


def test_the_dry_run_calendar_counts_what_the_account_sent_today(
    thousand: list[str], tmp_path: Path
) -> None:
    """120 of a 150/day cap already went out on the account (another job, just now): the
    next job's calendar says 30 today, not 150; the rest as the rolling day frees up."""
    before = bulkmail(*thousand, "--per-day", "150", "--rate", "0", "--dry-run", "--json")
    assert before.exit_code == 0, before.output
    assert json.loads(before.stdout)["calendar"]["days"][0]["count"] == 150  # nothing sent yet
    rows = "".join(f"Q{i},q{i}@example.edu\n" for i in range(120))
    (tmp_path / "earlier.csv").write_text("name,email\n" + rows, encoding="utf-8")
    earlier = bulkmail("send-reminders", "--csv", "earlier.csv", "--template", "t.txt",
                       "--subject", "x", "--store", str(tmp_path / "s.db"), "--rate", "0",
                       "--yes")  # fmt: skip
    assert earlier.exit_code == 0, earlier.output
    after = bulkmail(*thousand, "--per-day", "150", "--rate", "0", "--dry-run", "--json")
    assert after.exit_code == 0, after.output
    cal = json.loads(after.stdout)["calendar"]
    counts = [d["count"] for d in cal["days"]]
    assert counts[:2] == [30, 150] and sum(counts) == 1000, counts
    assert cal["text"].startswith("30 today"), cal["text"]
    text = bulkmail(*thousand, "--per-day", "150", "--rate", "0", "--dry-run")
    assert "calendar: 30 today" in " ".join(text.stdout.split()), text.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "Mon-Fri 8-18"], "--window: 'Mon-Fri 8-18' is not a send window"),
        (["--tz", "Europe/Berln"], "--tz: unknown time zone 'Europe/Berln'"),
        (["--not-after", "2020-01-01"], "--not-after 2020-01-01 is in the past"),
        (["--not-before", "2030-12-03", "--not-after", "2030-12-02"], "is not after"),
        (["--not-before", "soon"], "--not-before: 'soon' is not an ISO 8601"),
        (["--per-day", "0"], "--per-day (or BULKMAIL_PER_DAY): must be a positive"),
    ],
)
def test_bad_time_options_are_exit_2_and_create_nothing(
    thousand: list[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    result = bulkmail(*thousand, *extra, "--yes")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Usage:" not in result.stderr
    assert not (tmp_path / "s.db").exists()


def test_the_prompt_shows_the_calendar(thousand: list[str], tmp_path: Path) -> None:
    env = Environment(
        stdout=Console(width=200),
        stderr=Console(stderr=True, force_terminal=True, width=200),
        stdin_isatty=True,
    )
    args = [*thousand, "--per-day", "150", "--window", "Mon-Fri 08:00-18:00", *LATER,
            "--not-after", "2030-12-06T12:00"]  # fmt: skip
    with use(env):
        result = CliRunner().invoke(app, args, input="n\n")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert "Send 1000 reminders via outbox" in err
    assert "calendar: starts Mon 2 Dec 2030 08:00: 150 Mon 2 Dec 2030" in err
    assert "cannot finish before --not-after 2030-12-06 12:00 CET: 250 would expire" in err
    assert "--detach runs it in the background" in err and "Continue?" in err
    assert not (tmp_path / "s.db").exists()


def test_the_plan_carries_the_options_for_the_store() -> None:
    from bulkmail import jobs
    from bulkmail.config import Settings

    now = at(UTC, 2026, 12, 1, 12)
    send = jobs.SendOptions(
        windows=("Mon-Fri 08:00-18:00",), tz="America/New_York", not_after="2026-12-24",
        per_hour=30,
    )  # fmt: skip
    when = jobs.plan_timing(send, Settings(), "outbox", now=now)
    assert when.window_texts == ("Mon-Fri 08:00-18:00",) and when.tz == NEW_YORK
    assert when.not_after == at(NEW_YORK, 2026, 12, 25) and when.per_hour == 30
    assert when.per_day is None and when.schedule.windows == parse_window("Mon-Fri 08:00-18:00")
    assert timedelta(seconds=when.not_after - now) > timedelta(days=23)
