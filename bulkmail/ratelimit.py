"""The token bucket, as GCRA (generic cell rate algorithm).

A bucket of ``rate`` tokens per second and capacity ``burst`` is kept as one number, the
"theoretical arrival time" (TAT). Each send reserves the earliest slot the bucket allows
and moves the TAT on by one emission interval, so in any window of ``t`` seconds at most
``rate * t + burst`` slots are handed out. The computation is pure (``gcra_reserve``); the
TAT lives in the store, one row per provider account, so every process sending through the
same account shares one limit. Sleeping happens outside the store's transaction.

The slot is computed at the store's time, inside the transaction holding the row: on
PostgreSQL the database's clock, so workers on hosts whose clocks disagree share the rate
fairly; the worker gets a RELATIVE delay back and waits it on its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def gcra_reserve(tat: float | None, now: float, rate: float, burst: int) -> tuple[float, float]:
    """Reserve one slot. Returns ``(slot, new_tat)``: the time at which the caller may send
    (``slot >= now``) and the TAT to store.

    With interval ``T = 1/rate`` and tolerance ``tau = T * (burst - 1)``, a send at time
    ``s`` is allowed when ``s >= tat - tau``; afterwards ``tat = max(tat, s) + T``.
    """
    if rate <= 0:
        return now, tat if tat is not None else now
    interval = 1.0 / rate
    tolerance = interval * (max(burst, 1) - 1)
    current = now if tat is None else tat
    slot = max(now, current - tolerance)
    return slot, max(current, slot) + interval


class SlotStore(Protocol):
    def reserve_delay(
        self, key: str, rate: float, burst: int, *, clock: Callable[[], float] | None = None
    ) -> float: ...


@dataclass
class MemorySlots:
    """An in-process TAT table with the store's ``reserve_slot`` interface (for tests and
    for callers without a store)."""

    tats: dict[str, float]

    def __init__(self) -> None:
        self.tats = {}

    def reserve_slot(
        self, key: str, reserve: Callable[[float | None], tuple[float, float]]
    ) -> float:
        slot, self.tats[key] = reserve(self.tats.get(key))
        return slot

    def reserve_delay(
        self, key: str, rate: float, burst: int, *, clock: Callable[[], float] | None = None
    ) -> float:
        now = (clock or time.time)()
        slot = self.reserve_slot(key, lambda tat: gcra_reserve(tat, now, rate, burst))
        return max(0.0, slot - now)


class RateLimiter:
    """Hands out send slots for one account; the caller waits for its slot (the send loop
    does, so that a stop can interrupt the wait). ``clock`` returns POSIX seconds."""

    def __init__(
        self,
        slots: SlotStore,
        key: str,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.slots = slots
        self.key = key
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self) -> float:
        """Reserve the next slot and return its time on ``clock`` (now, when unlimited);
        the caller waits until then."""
        if self.unlimited:
            return self.clock()
        # the store reads its time inside its transaction (time spent waiting for the row's
        # lock must not yield a slot already in the past) and answers how long to wait from
        # then; counted from after the answer, the wait can only be longer, never shorter
        delay = self.slots.reserve_delay(self.key, self.rate, self.burst, clock=self.clock)
        return self.clock() + delay
