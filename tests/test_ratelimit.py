"""The token bucket (GCRA) with a fake clock: exact slots, burst, refill, shared state."""

from __future__ import annotations

import pytest

from bulkmail.ratelimit import MemorySlots, RateLimiter, gcra_reserve
from bulkmail.store import open_store


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False


def wait_for_slot(limiter: RateLimiter, clock: FakeClock) -> None:
    """What the send loop does with a limiter: reserve the next slot, sleep until it."""
    delay = limiter.reserve() - clock.now
    if delay > 0:
        clock.sleep(delay)


def slots(n: int, *, rate: float, burst: int, now: float = 0.0) -> list[float]:
    tat: float | None = None
    out = []
    for _ in range(n):
        slot, tat = gcra_reserve(tat, now, rate, burst)
        out.append(slot)
    return out


def test_burst_one_spaces_every_send_by_the_interval() -> None:
    assert slots(4, rate=2.0, burst=1) == [0.0, 0.5, 1.0, 1.5]


def test_burst_allows_that_many_at_once_then_the_rate() -> None:
    assert slots(6, rate=1.0, burst=3) == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


def test_idle_bucket_refills_to_burst_but_no_further() -> None:
    tat: float | None = None
    for _ in range(3):
        _, tat = gcra_reserve(tat, 0.0, 1.0, 3)
    # 100 s idle: the bucket is full again (3 tokens), not 100
    later = [gcra_reserve(tat, 100.0, 1.0, 3)]
    tat = later[0][1]
    for _ in range(3):
        slot, tat = gcra_reserve(tat, 100.0, 1.0, 3)
        later.append((slot, tat))
    assert [s for s, _ in later] == [100.0, 100.0, 100.0, 101.0]


def test_partial_refill() -> None:
    # rate 1/s, burst 3: drain at t=0, come back at t=1.5 -> one token back (plus half)
    tat: float | None = None
    for _ in range(3):
        _, tat = gcra_reserve(tat, 0.0, 1.0, 3)
    s1, tat = gcra_reserve(tat, 1.5, 1.0, 3)
    s2, tat = gcra_reserve(tat, 1.5, 1.0, 3)
    assert (s1, s2) == (1.5, 2.0)


def test_unlimited_rate_never_waits() -> None:
    assert slots(5, rate=0.0, burst=1, now=7.0) == [7.0] * 5


@pytest.mark.parametrize(("rate", "burst"), [(0.1, 1), (2.0, 1), (5.0, 4), (20.0, 2)])
def test_never_more_than_rate_t_plus_burst_in_any_window(rate: float, burst: int) -> None:
    times = slots(200, rate=rate, burst=burst)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            t = times[j] - start
            assert j - i + 1 <= rate * t + burst + 1e-9


def test_limiter_sleeps_until_its_slot_with_an_injected_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(MemorySlots(), "smtp:a", 0.1, 1, clock=clock)
    sent_at = []
    for _ in range(3):
        wait_for_slot(limiter, clock)
        sent_at.append(clock.now)
    assert sent_at == [1000.0, 1010.0, 1020.0]
    assert clock.slept == [10.0, 10.0]


def test_two_limiters_on_one_store_share_the_bucket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # two processes would each have their own Store object on the same file
    a, b = open_store(tmp_path / "s.db"), open_store(tmp_path / "s.db")
    clock = FakeClock()
    la = RateLimiter(a, "smtp:office@host:587", 1.0, 2, clock=clock)
    lb = RateLimiter(b, "smtp:office@host:587", 1.0, 2, clock=clock)
    times = []
    for limiter in (la, lb, la, lb, la):
        wait_for_slot(limiter, clock)
        times.append(clock.now)
    assert times == [1000.0, 1000.0, 1001.0, 1002.0, 1003.0]
    # another account has its own bucket
    lc = RateLimiter(a, "smtp:other@host:587", 1.0, 1, clock=clock)
    before = clock.now
    wait_for_slot(lc, clock)
    assert clock.now == before
