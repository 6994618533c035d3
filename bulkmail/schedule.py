"""A job's calendar: send windows in a time zone (office hours), the ``--not-before`` /
``--not-after`` span, the hourly and daily caps, and the estimate of when a job of N
messages finishes under all of them together with the per-second rate.

Pure: every function takes the time it works on (POSIX seconds or an aware datetime) and
returns POSIX seconds; nothing here reads the clock or sleeps, so tests pass fixed times.
Local times are turned into instants with ``zoneinfo`` for each local day, so windows follow
daylight saving time: "08:00-18:00" is 08:00 local on the day the clocks change too.

The caps hold in every rolling window: at most ``per_hour`` sends in any (t - 3600, t] and
``per_day`` in any (t - 86400, t]. The estimate is what a greedy limiter does: each message
goes at the earliest instant that the rate (GCRA, as ``bulkmail.ratelimit``), both caps,
the windows and ``not_after`` allow.
"""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bulkmail.errors import InputError

HOUR = 3600.0
DAY = 86400.0
EPSILON = 1e-6
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
WINDOW_EXAMPLE = '--window "Mon-Fri 08:00-18:00"'

Instant = float | datetime


def _seconds(t: Instant) -> float:
    """POSIX seconds of ``t``; a datetime must be aware (a naive one has no instant)."""
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(f"{t!r}: a naive datetime; give it a tzinfo")
        return t.timestamp()
    return float(t)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """Open on ``days`` (0 = Monday) from ``start`` to ``end``, in minutes after local
    midnight (``0 <= start < end <= 1440``). A window across midnight is two of these."""

    days: frozenset[int]
    start: int
    end: int


def _bad_window(text: str, why: str) -> InputError:
    return InputError(f"--window: {text!r} is not a send window ({why}); example: {WINDOW_EXAMPLE}")


_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _day(text: str, name: str) -> int:
    key = name.strip().lower()
    for n, (day, full) in enumerate(zip(DAY_NAMES, _FULL_DAY_NAMES, strict=True)):
        if key in (day.lower(), full):
            return n
    raise _bad_window(text, f"unknown day {name.strip()!r}; days are Mon Tue Wed Thu Fri Sat Sun")


def _days(text: str, spec: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.partition("-")
        if not first.strip():
            raise _bad_window(text, f"empty day in {spec!r}")
        lo = _day(text, first)
        hi = _day(text, last) if dash else lo
        # a range may wrap around the week: "Fri-Mon" is Fri, Sat, Sun, Mon
        days.update((lo + n) % 7 for n in range((hi - lo) % 7 + 1))
    return frozenset(days)


_TIME = re.compile(r"(\d{1,2}):(\d{2})")


def _minutes(text: str, hhmm: str, *, end: bool) -> int:
    m = _TIME.fullmatch(hhmm.strip())
    if m is None:
        raise _bad_window(text, f"{hhmm.strip()!r} is not a time HH:MM (24-hour)")
    hours, minutes = int(m[1]), int(m[2])
    if end and (hours, minutes) == (24, 0):
        return 1440
    if hours > 23 or minutes > 59:
        raise _bad_window(text, f"{hhmm.strip()!r} is not a time of day (00:00-23:59, or 24:00)")
    return hours * 60 + minutes


def parse_window(text: str) -> tuple[Window, ...]:
    """``"Mon-Fri 08:00-18:00"``, ``"Mon,Wed,Fri 09:00-12:00"``, ``"Sat-Sun 10:00-14:00"``,
    ``"daily 08:00-18:00"`` (or ``"*"``), ``"08:00-18:00"`` (every day); an end of 24:00 is
    the next midnight. A window across midnight, ``"Fri 22:00-02:00"``, runs from Friday
    22:00 to Saturday 02:00 (two ``Window``). Raises InputError (exit 2) with an example."""
    parts = text.split()
    if len(parts) == 1:
        day_spec, span = "daily", parts[0]
    elif len(parts) == 2:
        day_spec, span = parts
    else:
        raise _bad_window(text, "expected DAYS HH:MM-HH:MM")
    start_text, dash, end_text = span.partition("-")
    if not dash:
        raise _bad_window(text, f"{span!r} is not a span of time HH:MM-HH:MM")
    days = _days(text, day_spec)
    start = _minutes(text, start_text, end=False)
    end = _minutes(text, end_text, end=True)
    if start == end:
        raise _bad_window(text, "it opens and closes at the same time; a whole day is 00:00-24:00")
    if start < end:
        return (Window(days, start, end),)
    # across midnight: the evening part on the given days, the morning part the day after
    after = frozenset((d + 1) % 7 for d in days)
    morning = (Window(after, 0, end),) if end > 0 else ()
    return (Window(days, start, 1440), *morning)


def parse_windows(texts: Iterable[str]) -> tuple[Window, ...]:
    return tuple(w for text in texts for w in parse_window(text))


# --------------------------------------------------------------------------- time zones


def local_zone(env: dict[str, str] | None = None) -> tzinfo:
    """This machine's zone as an IANA zone (so DST is followed): ``TZ`` when it names one,
    else the zone /etc/localtime points to or holds; UTC when none can be found."""
    env = dict(os.environ) if env is None else env
    name = env.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = Path("/etc/localtime")
    try:
        target = str(localtime.resolve())
        if "/zoneinfo/" in target:
            return ZoneInfo(target.split("/zoneinfo/", 1)[1])
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return UTC


def parse_zone(name: str | None) -> tzinfo:
    """``--tz NAME`` (an IANA name such as Europe/Berlin); None: the local zone."""
    if name is None or not name.strip():
        return local_zone()
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(
            f"--tz: unknown time zone {name!r}; give an IANA name such as Europe/Berlin "
            "or America/New_York"
        ) from None


def zone_name(tz: tzinfo) -> str:
    key = getattr(tz, "key", None)
    return str(key) if key and key != "localtime" else str(datetime.now(tz).tzname() or "UTC")


def parse_when(value: str, tz: tzinfo, flag: str, *, end_of_day: bool = False) -> float:
    """An ISO 8601 date or date and time; a naive one is in ``tz``. A bare date is that
    day's start, or with ``end_of_day`` (``--not-after 2026-12-04``) the next midnight."""
    text = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text)
            if end_of_day:
                d += timedelta(days=1)
            return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"{flag}: {value!r} is not an ISO 8601 date or date and time; "
            f"example: {flag} 2026-12-01T08:00 (in --tz) or {flag} 2026-12-01T08:00+01:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()


def _local(t: float, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(t, tz)


def _midnight(d: date, tz: tzinfo) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """When sending is allowed: inside any of ``windows`` (local times in ``tz``), or always
    when there are none. Times in, POSIX seconds out; ``math.inf`` for "never closes"."""

    windows: tuple[Window, ...] = ()
    tz: tzinfo = UTC

    @property
    def always_open(self) -> bool:
        return not self.windows

    def _spans(self, d: date) -> list[tuple[float, float]]:
        """The open spans of local day ``d``, as instants, in order. A local time that does
        not exist (the hour the clocks skip) is read with the offset before the change, so
        a window opening in it opens at the first real instant after."""
        out: list[tuple[float, float]] = []
        for w in self.windows:
            if d.weekday() not in w.days:
                continue
            a = self._at(d, w.start)
            b = self._at(d, w.end)
            if b > a:
                out.append((a, b))
        out.sort()
        return out

    def _at(self, d: date, minutes: int) -> float:
        day = d + timedelta(days=minutes // 1440)
        m = minutes % 1440
        return datetime(day.year, day.month, day.day, m // 60, m % 60, tzinfo=self.tz).timestamp()

    def intervals(self, t: Instant) -> Iterator[tuple[float, float]]:
        """The open stretches ``[a, b)`` that end after ``t``, in order, windows that touch
        merged (Mon-Fri 00:00-24:00 is one stretch); infinite, and a stretch that never
        closes is ``(a, inf)``."""
        now = _seconds(t)
        if not self.windows:
            yield (-math.inf, math.inf)
            return
        d = _local(now, self.tz).date() - timedelta(days=1)
        current: tuple[float, float] | None = None
        since = d
        while True:
            for a, b in self._spans(d):
                if current is None:
                    current, since = (a, b), d
                elif a <= current[1]:
                    current = (current[0], max(current[1], b))
                else:
                    if current[1] > now:
                        yield current
                    current, since = (a, b), d
            if current is not None and (d - since).days > 8:
                # open without a break for more than a week: the weekly pattern covers
                # every instant, so this stretch never ends
                yield (current[0], math.inf)
                return
            d += timedelta(days=1)

    def _first(self, t: Instant) -> tuple[float, float, float]:
        now = _seconds(t)
        a, b = next(self.intervals(now))
        return now, a, b

    def is_open(self, t: Instant) -> bool:
        now, a, b = self._first(t)
        return a <= now < b

    def next_open(self, t: Instant) -> float:
        """``t`` when sending is allowed then, else the instant the next window opens."""
        now, a, _ = self._first(t)
        return max(now, a)

    def window_end(self, t: Instant) -> float:
        """When the open stretch ``t`` is in closes (``inf``: never); ``t`` itself when it
        is not open."""
        now, a, b = self._first(t)
        return b if a <= now else now


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """A job's time options, parsed and checked: what the plan carries for the store and
    the send loop (``not_before``/``not_after`` as POSIX seconds)."""

    schedule: Schedule = field(default_factory=Schedule)
    not_before: float | None = None
    not_after: float | None = None
    per_hour: int | None = None
    per_day: int | None = None
    window_texts: tuple[str, ...] = ()  # as given, for the job record and messages

    @property
    def tz(self) -> tzinfo:
        return self.schedule.tz

    @property
    def active(self) -> bool:
        """Whether any of the caps, windows, --not-before or --not-after was given (then the
        dry run and the prompt show the calendar)."""
        return bool(
            self.schedule.windows
            or self.not_before is not None
            or self.not_after is not None
            or self.per_hour
            or self.per_day
        )


def _cap(value: int | None, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or value < 1:
        raise InputError(f"{source}: must be a positive whole number of emails, got {value}")
    return int(value)


def timing(
    *,
    windows: Sequence[str] = (),
    tz: str | None = None,
    not_before: str | None = None,
    not_after: str | None = None,
    per_hour: int | None = None,
    per_day: int | None = None,
    per_hour_from: str = "--per-hour",
    per_day_from: str = "--per-day",
    now: float,
) -> Timing:
    """Parse and check the time options (InputError, exit 2, naming the option): windows,
    a known zone, --not-after after --not-before and not in the past, positive caps."""
    zone = parse_zone(tz)
    start = parse_when(not_before, zone, "--not-before") if not_before else None
    end = parse_when(not_after, zone, "--not-after", end_of_day=True) if not_after else None
    if end is not None:
        if start is not None and end <= start:
            raise InputError(
                f"--not-after {not_after} is not after --not-before {not_before}: "
                "nothing could be sent"
            )
        if end <= now:
            raise InputError(
                f"--not-after {not_after} is in the past (now {_stamp(now, zone)}): "
                "every delivery would expire at once"
            )
    return Timing(
        schedule=Schedule(parse_windows(windows), zone),
        not_before=start,
        not_after=end,
        per_hour=_cap(per_hour, per_hour_from),
        per_day=_cap(per_day, per_day_from),
        window_texts=tuple(windows),
    )


# --------------------------------------------------------------------------- the calendar


@dataclass(frozen=True)
class CalendarDay:
    """How many messages go out on local day ``date``; ``until``: when that day's last
    window closes (None without windows)."""

    date: date
    count: int
    first: float
    last: float
    until: float | None = None


@dataclass(frozen=True)
class Calendar:
    now: float
    tz: tzinfo
    days: tuple[CalendarDay, ...]
    starts_at: float | None  # the first send; None when nothing goes out
    finishes_at: float | None  # the last send
    expiring: int  # left over at not_after
    not_after: float | None = None
    times: tuple[float, ...] = ()  # every send, with keep_times (tests, the send loop's checks)

    @property
    def sent(self) -> int:
        return sum(d.count for d in self.days)


def _room(times: list[float], t: float, cap: int, span: float) -> int:
    """How many more sends may go at instant ``t`` under ``cap`` per ``span`` seconds, all
    earlier sends being ``times`` (sorted): the j-th goes if the send ``cap`` places before
    it is out of the window, and sends at ``t`` itself never are."""
    if not cap:
        return 2**62
    k = len(times)
    return bisect_right(times, t - span + EPSILON, max(0, k - cap), k) - (k - cap)


def plan_calendar(
    count: int,
    *,
    start: float,
    rate: float = 0.0,
    burst: int = 1,
    per_hour: int | None = None,
    per_day: int | None = None,
    schedule: Schedule | None = None,
    not_after: float | None = None,
    history: Iterable[float] = (),
    now: float | None = None,
    keep_times: bool = False,
) -> Calendar:
    """When ``count`` messages go out from ``start`` on: per local day how many, when the
    last goes, how many are left at ``not_after``. ``history``: the account's sends before
    ``start`` (the rolling caps count them). ``now`` (default ``start``) is "today".

    Simulated in blocks, one per open stretch of time: where a block starts is worked out
    once (the rate, the time the caps free up, the next window); inside it each send is a
    few comparisons (the send ``per_hour`` places back must be an hour old), so 100,000
    messages take a fraction of a second however the caps, windows and rate interact."""
    schedule = schedule or Schedule()
    tz = schedule.tz
    now = start if now is None else now
    step = 1.0 / rate if rate > 0 else 0.0
    tolerance = step * (max(burst, 1) - 1)
    hour_cap = per_hour or 0
    day_cap = per_day or 0
    times = sorted(min(h, start) for h in history if h > start - DAY)
    past = len(times)
    spans = schedule.intervals(start)
    open_at, close_at = next(spans)
    tat: float | None = None  # the GCRA's theoretical arrival time (bulkmail.ratelimit)
    last = start
    left = count
    expiring = 0
    days: list[CalendarDay] = []
    day_end = -math.inf
    while left > 0:
        k = len(times)
        # the block's first send: the earliest instant the caps, the rate and a window allow
        ready = last
        if hour_cap and k >= hour_cap:
            ready = max(ready, times[k - hour_cap] + HOUR)
        if day_cap and k >= day_cap:
            ready = max(ready, times[k - day_cap] + DAY)
        slot = ready if tat is None or not step else max(ready, tat - tolerance)
        while slot >= close_at:
            open_at, close_at = next(spans)
        slot = max(slot, open_at)
        if not_after is not None and slot >= not_after:
            expiring = left
            break
        # then the sends that follow without waiting for anything but the rate: with a
        # full bucket at `slot`, send j goes at max(slot, base + j * step)
        base = (slot if tat is None else max(tat, slot)) - tolerance
        end = close_at if not_after is None else min(close_at, not_after)
        if not step:
            # no rate: the block all goes at `slot`, as many as the caps leave room for
            block = [slot] * min(
                left, _room(times, slot, hour_cap, HOUR), _room(times, slot, day_cap, DAY)
            )
        else:
            block = [slot]
            j = 1
            while j < left:
                t = max(slot, base + j * step)
                if t >= end:
                    break
                # the send `cap` places back must be out of the rolling window
                i = k + j - hour_cap
                if (
                    hour_cap
                    and i >= 0
                    and (times[i] if i < k else block[i - k]) + HOUR > t + EPSILON
                ):
                    break
                i = k + j - day_cap
                if day_cap and i >= 0 and (times[i] if i < k else block[i - k]) + DAY > t + EPSILON:
                    break
                block.append(t)
                j += 1
        if step:
            tat = base + tolerance + len(block) * step
        # count the block per local day
        lo = 0
        while lo < len(block):
            if block[lo] >= day_end:
                d = _local(block[lo], tz).date()
                day_end = _midnight(d + timedelta(days=1), tz)
                days.append(CalendarDay(d, 0, block[lo], block[lo]))
            hi = bisect_left(block, day_end, lo)
            until = None if schedule.always_open else min(close_at, day_end)
            prev = days[-1]
            days[-1] = CalendarDay(
                prev.date, prev.count + hi - lo, prev.first, block[hi - 1], until
            )
            lo = hi
        times.extend(block)
        last = block[-1]
        left -= len(block)
    first = days[0].first if days else None
    finish = days[-1].last if days else None
    sends = tuple(times[past:]) if keep_times else ()
    return Calendar(now, tz, tuple(days), first, finish, expiring, not_after, sends)


# --------------------------------------------------------------------------- text


def _stamp(t: float, tz: tzinfo) -> str:
    local = _local(t, tz)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"


def _day_label(d: date, today: date) -> str:
    ahead = (d - today).days
    if ahead == 0:
        return "today"
    if 0 < ahead < 7:
        return DAY_NAMES[d.weekday()]
    year = f" {d.year}" if d.year != today.year else ""
    return f"{DAY_NAMES[d.weekday()]} {d.day} {_MONTHS[d.month - 1]}{year}"


def _clock(t: float, tz: tzinfo) -> str:
    local = _local(t + 30, tz)  # to the nearest minute
    return f"{local:%H:%M}"


def describe(cal: Calendar, *, most: int = 6) -> str:
    """ "150 today until 18:00, 150 Tue, 42 Wed; done about Wed 09:12 CET" (long calendars
    show their first days and the last)."""
    tz = cal.tz
    today = _local(cal.now, tz).date()
    if not cal.days:
        return "nothing can go out before --not-after"
    assert cal.starts_at is not None and cal.finishes_at is not None
    lead = ""
    if cal.starts_at > cal.now + 60:
        start_day = _day_label(_local(cal.starts_at, tz).date(), today)
        lead = f"starts {start_day} {_clock(cal.starts_at, tz)}: "
    # days of the week ahead by their name; a calendar that starts later than that names
    # its first day in full and the days of the week after it by their name
    ref = today
    parts: list[str] = []
    for n, day in enumerate(cal.days):
        label = _day_label(day.date, ref)
        if n == 0 and (day.date - today).days >= 7:
            ref = day.date
        text = f"{day.count} {label}"
        more = n < len(cal.days) - 1
        if label == "today" and more and day.until is not None and not math.isinf(day.until):
            text += f" until {_clock(day.until - 30, tz)}"
        parts.append(text)
    if len(parts) > most:
        parts = [*parts[: most - 2], f"... ({len(parts)} days)", parts[-1]]
    finish = _local(cal.finishes_at, tz)
    finish_day = _day_label(finish.date(), ref)
    when = _clock(cal.finishes_at, tz)
    done = f"done about {when}" if finish_day == "today" else f"done about {finish_day} {when}"
    return f"{lead}{', '.join(parts)}; {done} {finish.tzname()}"


def warning(cal: Calendar) -> str | None:
    """ "cannot finish before --not-after 2026-12-04 17:00 CET: 310 would expire", or None."""
    if not cal.expiring or cal.not_after is None:
        return None
    return (
        f"cannot finish before --not-after {_stamp(cal.not_after, cal.tz)}: "
        f"{cal.expiring} would expire"
    )
