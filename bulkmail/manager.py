"""The send loop: claim a delivery, wait for the shared rate limit, send, record the outcome.

``EmailManager`` runs one worker on one job: it registers on the job (taking over deliveries
that a dead worker left in ``sending``: they are in doubt and are sent again with the same
Message-ID), heart-beats, and runs ``concurrency`` sending threads, each with its own
provider connection, all drawing from the one shared rate limit. Every delivery is claimed
(``sending`` committed) before the provider is called and its outcome committed right after.

Batches: with a provider that carries several messages per request (``BatchProvider``,
Mailtrap's ``/api/batch``) and a ``batch_size`` over 1, each sending thread claims up to
``batch_size`` deliveries in one transaction (every one ``sending`` before the request),
sends them in one request and commits their outcomes together; at a finite rate a batch
holds at most ``burst`` messages and goes at its last message's slot, so the rate's
``rate * t + burst`` bound still holds. A provider's own request limit (``request_limit``)
is a second shared bucket, taken before every request, batch or single.

Fencing: a worker hands a message to the provider only while it still owns the delivery.
It notes, on its monotonic clock, when it started its last heartbeat that the store
renewed; others take it for gone only once that heartbeat is ``stale_after`` old by the
store's clock. Right before each send it checks that its lease is younger than that by a
margin (one heartbeat interval); if not (it was stopped with SIGSTOP, the machine froze) it
renews its heartbeat first, and sends only if nobody took it over meanwhile.

``--recheck``: before each claim the job's database query runs again (at most once a minute,
``bulkmail.recheck``) and the pending recipients it no longer returns are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from typing import Literal

from bulkmail.compose import Composer, Templates
from bulkmail.errors import BulkmailError, ExitCode, StoreError, Terminated, exit_code_for
from bulkmail.liveness import HEARTBEAT_INTERVAL, STALE_AFTER, this_host, this_host_id, worker_alive
from bulkmail.models import Message, Recipient
from bulkmail.providers.base import (
    BatchProvider,
    FatalError,
    PermanentError,
    Provider,
    TransientError,
)
from bulkmail.ratelimit import RateLimiter
from bulkmail.recheck import RECHECK_INTERVAL, Recheck, RecheckUnavailable, for_job
from bulkmail.schedule import Schedule, parse_windows, parse_zone
from bulkmail.store import (
    Claimed,
    ClaimedBatch,
    Counts,
    DeliveryRecord,
    JobRecord,
    JobState,
    JobStore,
    Outcome,
    Reclaimed,
    Stop,
    Wait,
)
from bulkmail.store.records import WORKER_STOPPED
from bulkmail.storeretry import retrying

log = logging.getLogger("bulkmail")

MAX_CONSECUTIVE_TRANSIENT = 10
CLAIM_LEAD = 0.05  # seconds before its rate slot that a delivery is claimed and built
TAIL_POLL = 0.5  # seconds between looks at other workers' last messages in flight
MAX_BACKOFF = 24 * 3600.0  # the longest wait before a retry: one day

THROTTLE_PAUSE_AFTER = 600.0  # seconds of nothing but throttling replies before the job pauses
WINDOW_MARGIN = 30.0  # no delivery is started this close to the end of a send window
LONG_WAIT = 600.0  # a foreground run suggests --detach for waits longer than this

EventKind = Literal["sending", "sent", "failed", "retry", "stopped", "waiting"]


@dataclass(frozen=True)
class Event:
    """A step of the send loop, for progress displays (called from sending threads)."""

    kind: EventKind
    email: str = ""
    name: str = ""
    error: str = ""
    attempts: int = 0
    until: float = 0.0  # "waiting": until when (POSIX seconds); ``error`` says why
    retry_in: float = 0.0  # "retry": seconds until the next attempt


@dataclass(frozen=True)
class RunResult:
    job_id: int
    state: str  # the job's state when this worker stopped
    counts: Counts
    error: str | None
    interrupted: bool  # by Ctrl-C or SIGTERM
    reclaimed: int  # in-doubt deliveries taken over at the start
    terminated: bool = False  # interrupted by SIGTERM

    @property
    def exit_code(self) -> ExitCode:
        return exit_code_for(
            self.state, self.counts, interrupted=self.interrupted, terminated=self.terminated
        )

    @property
    def hint(self) -> str | None:
        """The line telling the user how to go on when the run did not finish the job."""
        resume = f"bulkmail resume {self.job_id}"
        if self.interrupted:
            how = "terminated" if self.terminated else "interrupted"
            if self.state == JobState.RUNNING:  # other live workers go on with the job
                return (
                    f"{how}: this worker left job {self.job_id}; its other workers go on "
                    f"(bulkmail status {self.job_id} --watch)"
                )
            return f"{how}: job {self.job_id} paused; continue with: {resume}"
        if self.state == JobState.RUNNING and self.error:
            return (
                f"this worker left job {self.job_id}: {self.error}; its other workers go on "
                f"(bulkmail status {self.job_id} --watch)"
            )
        if self.state in (JobState.PAUSED, JobState.ABORTED, JobState.STALLED):
            return f"job {self.job_id} {self.state}: {self.error}; after fixing it: {resume}"
        return None


def backoff_delay(attempts: int, backoff: float, retry_after: float | None = None) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones: the server's
    Retry-After when it gave one, else ``backoff`` doubling (5, 10, 20 ... for 5)."""
    if retry_after is not None and retry_after >= 0:
        return retry_after
    doublings = min(max(1, attempts) - 1, 64)  # 2**64 periods is past any cap already
    return float(max(0.0, min(backoff * 2.0**doublings, MAX_BACKOFF)))


def job_schedule(job: JobRecord) -> Schedule:
    """The job's send windows in its zone (always open without windows); a zone this
    machine does not know is read as UTC rather than stopping the job."""
    try:
        zone = parse_zone(job.tz) if job.tz else parse_zone(None)
    except BulkmailError:
        zone = parse_zone("UTC")
    return Schedule(parse_windows(job.windows), zone)


def _stamp(t: float, tz: tzinfo) -> str:
    local = datetime.fromtimestamp(t, tz)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def composer_for(job: JobRecord) -> Composer:
    return Composer(Templates.from_json(job.subject, job.templates), sender=job.sender)


def recipient_of(d: DeliveryRecord) -> Recipient:
    return Recipient(row=d.row, email=d.email, name=d.name, fields=d.fields)


def build_message(composer: Composer, d: DeliveryRecord) -> Message:
    """The delivery's message, carrying its job and delivery ids for the provider's events
    (Mailtrap's custom_variables; the webhook receiver matches events on these keys)."""
    message = composer.build(recipient_of(d), d.message_id)
    ids = (("bulkmail_job", str(d.job_id)), ("bulkmail_delivery", str(d.id)))
    return replace(message, variables=ids)


class EmailManager:
    """Runs one worker of one job until the job is done, stopped or interrupted.

    ``clock`` gives POSIX seconds; ``sleep(seconds)`` waits and returns True when a stop
    was requested meanwhile (default: the manager's stop event); ``monotonic`` measures the
    age of the worker's lease (its last renewed heartbeat). All are injected so the loop's
    timing can be tested without real waiting. On a server store the leases use the store's
    (database's) clock, not ``clock``.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: int,
        *,
        provider_factory: Callable[[JobRecord], Provider],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], bool] | None = None,
        on_event: Callable[[Event], None] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        stale_after: float = STALE_AFTER,
        max_consecutive_transient: int = MAX_CONSECUTIVE_TRANSIENT,
        exclusive: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        throttle_pause: float = THROTTLE_PAUSE_AFTER,
        window_margin: float = WINDOW_MARGIN,
        recheck_urls: Sequence[str] = (),
        recheck_interval: float = RECHECK_INTERVAL,
    ) -> None:
        # a store error (a restarted server, a lock held too long) is retried for up to the
        # stale window before this worker gives up on the job
        self.store = retrying(store, give_up_after=stale_after)
        self.job_id = job_id
        self.provider_factory = provider_factory
        self.clock = clock
        self._stop = threading.Event()
        self.sleep = sleep or self._stop.wait
        self.on_event = on_event or (lambda event: None)
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.max_consecutive_transient = max_consecutive_transient
        self.exclusive = exclusive
        self.worker_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._consecutive_transient = 0
        self._stop_as: str | None = None  # "paused" | "aborted" when this worker stops the job
        self._stop_local = False  # ... for a trouble of its own: it only leaves a shared job
        self._error: str | None = None
        self._crash: BaseException | None = None
        self._failpoint = _Failpoint.from_env()
        self.monotonic = monotonic
        # when (monotonic) the last heartbeat the store renewed was started: the lease
        self._lease_at: float | None = None
        self.throttle_pause = throttle_pause
        self.window_margin = window_margin
        self._throttled_since: float | None = None  # first throttling reply since a success
        self._waiting: tuple[str, float] | None = None  # what the job row says we wait for
        self._schedule: Schedule | None = None
        # --recheck: the URLs (with passwords) the job's database may be reached by
        self.recheck_urls = tuple(recheck_urls)
        self.recheck_interval = recheck_interval
        self.recheck: Recheck | None = None

    # -- control

    def request_stop(
        self, state: str | None = None, error: str | None = None, *, local: bool | None = None
    ) -> None:
        """Stop before the next message; ``state`` is what the job becomes (paused/aborted).

        ``local``: the trouble is this worker's own (its signal, its connection to the
        provider or the store): with other live workers on the job it only leaves the job,
        which becomes ``state`` when it was the last live worker. Default: True for
        ``paused``, False for ``aborted`` (rejected credentials abort the whole job)."""
        with self._lock:
            if state is not None and self._stop_as is None:
                self._stop_as, self._error = state, error
                self._stop_local = state == JobState.PAUSED if local is None else local
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- running

    def run(self) -> RunResult:
        """Register, send until done, unregister. Ctrl-C (KeyboardInterrupt) or SIGTERM
        (``Terminated``) pauses the job, or only takes this worker out of it while other
        live workers go on: the messages in flight are finished (a second one abandons them:
        they are in doubt on resume)."""
        host, now = this_host(), self.clock()
        registration = self.store.register_worker(
            self.job_id,
            worker_id=self.worker_id,
            host=host,
            host_id=this_host_id(),
            pid=os.getpid(),
            now=self._store_now(),
            alive=lambda w: worker_alive(w, now=now, host=host, stale_after=self.stale_after),
            exclusive=self.exclusive,
        )
        if registration.reclaimed:
            log.warning(
                "job %s: %d deliveries were in flight when the last worker stopped; "
                "sending them again with the same Message-ID",
                self.job_id,
                registration.reclaimed,
            )
        job = self.store.get_job(self.job_id)
        self._schedule = job_schedule(job)
        try:
            self.recheck = for_job(
                job, urls=self.recheck_urls, clock=self.clock, interval=self.recheck_interval
            )
        except RecheckUnavailable as exc:  # sending unchecked would break the promise
            log.error("job %s: %s", self.job_id, exc)
            self.request_stop("paused", str(exc))
        limiter = RateLimiter(self.store, job.account, job.rate, job.burst, clock=self.clock)
        composer = composer_for(job)
        heartbeat = threading.Thread(target=self._heartbeat, name="bulkmail-heartbeat", daemon=True)
        heartbeat.start()
        # one "done" event per sending thread, set when it has recorded its last outcome:
        # waited on instead of Thread.join, which after a KeyboardInterrupt inside it can
        # report a still-sending thread as finished (CPython gh-90882): the second wait
        # would return at once and abandon the message in flight (a duplicate on resume)
        done = [threading.Event() for _ in range(max(1, job.concurrency))]
        threads = [
            threading.Thread(
                target=self._sender,
                args=(job, limiter, composer, finished),
                name=f"bulkmail-sender-{n}",
                daemon=True,
            )
            for n, finished in enumerate(done)
        ]
        for t, finished in zip(threads, done, strict=True):
            if self._stop.is_set():  # stopped before the first send (--recheck unavailable)
                finished.set()
            else:
                t.start()
        interrupted = terminated = False
        try:
            self._join(done)
        except KeyboardInterrupt as exc:
            interrupted, terminated = True, isinstance(exc, Terminated)
            signame, again = ("SIGTERM", "again") if terminated else ("Ctrl-C", "Ctrl-C again")
            self.request_stop("paused", f"interrupted ({signame})")
            log.warning(
                "%s: finishing the message in flight (%s to abandon it)",
                "terminated" if terminated else "interrupted",
                again,
            )
            try:
                self._join(done)
            except KeyboardInterrupt:
                log.warning("abandoned the message in flight: it is in doubt until resumed")
        finally:
            self._stop.set()
        heartbeat.join(timeout=5)
        if self._waiting is not None:
            with contextlib.suppress(BulkmailError):
                self.store.set_waiting(self.job_id, None, None)
        try:
            now = self.clock()
            state = self.store.finish_worker(
                self.worker_id,
                now=now,
                stop=self._stop_as,
                error=self._error,
                local=self._stop_local,
                alive=lambda w: worker_alive(w, now=now, host=host, stale_after=self.stale_after),
            )
            counts = self.store.counts(self.job_id)
        except StoreError as exc:
            # the job stays 'running' with no live worker: `status` shows it stalled and
            # `resume` takes it over; deliveries in flight are in doubt then
            log.error("job store error: %s", exc)
            state, counts = "stalled", Counts()
            self._error = self._error or f"job store error: {exc}"
        self.on_event(Event("stopped"))
        if self._crash is not None:
            raise self._crash
        return RunResult(
            job_id=self.job_id,
            state=state,
            counts=counts,
            error=self._error,
            interrupted=interrupted,
            reclaimed=registration.reclaimed,
            terminated=terminated,
        )

    @staticmethod
    def _join(done: list[threading.Event]) -> None:
        """Wait until every sending thread has set its ``done`` event; in short waits so a
        Ctrl-C or SIGTERM reaches the main thread promptly (an interrupted wait leaves the
        event as it was, so waiting again is exact)."""
        for event in done:
            while not event.wait(0.2):
                pass

    def _store_now(self) -> float | None:
        """The ``now`` for the store's lease operations: None on a server store (it uses the
        database's clock, shared by every host), this worker's clock on SQLite (one host)."""
        return None if self.store.server else self.clock()

    def _beat(self) -> str:
        """One heartbeat; when the store renewed it, the lease runs from its start."""
        started = self.monotonic()
        state = self.store.heartbeat(self.worker_id, now=self._store_now())
        if state != WORKER_STOPPED and state != "None":
            with self._lock:
                if self._lease_at is None or started > self._lease_at:
                    self._lease_at = started
        return state

    @property
    def lease_window(self) -> float:
        """How long after the start of its last renewed heartbeat this worker still sends
        without renewing first: the stale window less a margin of one heartbeat interval."""
        return max(self.stale_after - self.heartbeat_interval, self.stale_after / 2)

    def _still_owner(self) -> bool:
        """The fence before the point of no return (``provider.send``): does this worker
        still own its deliveries? Yes while its lease is fresh; otherwise it renews its
        heartbeat now and owns them unless the answer is that others took it for gone
        (then its delivery is theirs: nothing is sent, nothing recorded). A store error
        propagates: without an answer nothing is sent."""
        with self._lock:
            lease = self._lease_at
        if lease is not None and self.monotonic() - lease < self.lease_window:
            return True
        state = self._beat()
        return state != WORKER_STOPPED and state != "None"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                state = self._beat()
            except BulkmailError as exc:  # a busy store must not kill the worker
                log.warning("heartbeat failed: %s", exc)
                continue
            if state == "stopped":
                log.warning(
                    "job %s: this worker's heartbeat had gone stale and other workers took "
                    "over its deliveries: stopping before the next message",
                    self.job_id,
                )
                self._stop.set()
            elif state != "running":
                log.warning(
                    "job %s is now %s: stopping before the next message", self.job_id, state
                )
                self._stop.set()
            else:
                try:
                    self._reclaim()
                except BulkmailError as exc:
                    log.warning("looking for gone workers failed: %s", exc)

    def _reclaim(self) -> Reclaimed:
        """Take over the deliveries of the job's workers that are gone (several workers on
        one job: a dead pid on this host, or a heartbeat gone stale anywhere)."""
        now, host = self.clock(), this_host()
        held = self.store.reclaim(
            self.job_id,
            worker_id=self.worker_id,
            now=self._store_now(),
            alive=lambda w: worker_alive(w, now=now, host=host, stale_after=self.stale_after),
        )
        if held.reclaimed:
            log.warning(
                "job %s: %d deliveries were in flight under a worker that is gone; "
                "sending them again with the same Message-ID",
                self.job_id,
                held.reclaimed,
            )
        return held

    def _settled(self) -> bool:
        """Nothing is pending: may this sending thread leave? Not while another worker holds
        a message in flight: if that worker dies, its message comes back to us (reclaimed,
        in doubt). Waits a little and returns False to look again; our own threads finish
        their own messages."""
        held = self._reclaim()
        if held.reclaimed:
            return False
        if not held.elsewhere:
            return True
        return self.sleep(TAIL_POLL)  # True: a stop was requested meanwhile

    def _sender(
        self, job: JobRecord, limiter: RateLimiter, composer: Composer, done: threading.Event
    ) -> None:
        provider: Provider | None = None
        try:
            provider = self.provider_factory(job)
            with contextlib.suppress(TransientError):  # the first send tries again
                provider.connect()
            requests: RateLimiter | None = None
            batching = isinstance(provider, BatchProvider)
            if isinstance(provider, BatchProvider):
                limit = provider.request_limit
                if limit is not None:
                    requests = RateLimiter(
                        self.store, limit.key, limit.rate, limit.burst, clock=self.clock
                    )
                batching = provider.batch_size > 1
            if isinstance(provider, BatchProvider) and batching:
                self._batch_loop(job, provider, limiter, requests, composer)
            else:
                self._send_loop(job, provider, limiter, composer, requests)
        except FatalError as exc:
            # rejected credentials abort the job; a refusal of this worker's own connection
            # (e.g. a 554 greeting) only takes it out of a job other live workers go on with
            self.request_stop("aborted", str(exc), local=exc.local)
        except StoreError as exc:  # the store stayed locked or unreachable past its timeout
            log.error("job store error: %s", exc)
            self.request_stop("paused", f"job store error: {exc}")
        except BaseException as exc:  # a bug: stop the job, report it, keep the store sane
            log.exception("unexpected error in the send loop")
            with self._lock:
                self._crash = self._crash or exc
            self.request_stop("paused", f"internal error: {exc!r}")
        finally:
            try:
                if provider is not None:
                    provider.close()
            finally:
                done.set()

    def _send_loop(
        self,
        job: JobRecord,
        provider: Provider,
        limiter: RateLimiter,
        composer: Composer,
        requests: RateLimiter | None = None,
    ) -> None:
        # the outcome of the last message, when it can ride along with the next claim's
        # transaction (unlimited rate: the next claim follows at once); always committed
        # before the next message is handed to the provider
        pending: Outcome | None = None
        try:
            while not self._stop.is_set():
                slot: float | None = None
                held = self._held_back(job)
                if held is not None:
                    if self._wait_visibly(*held):
                        return
                    continue
                if not limiter.unlimited:
                    # take a rate slot only when a delivery is due, so backoff waits don't
                    # burn the account's quota
                    due = self.store.next_due(self.job_id, now=self.clock())
                    if due is None:
                        if self._settled():
                            return  # done (other threads may still be finishing)
                        continue
                    if due > 0:
                        if self.sleep(min(due, self.heartbeat_interval)):
                            return
                        continue
                    # claim and build just before the slot, so the time between the slot
                    # and the send (what the server sees) stays small
                    slot = limiter.reserve()
                    if not self._wait_until(slot - CLAIM_LEAD) or self._stop.is_set():
                        return
                self._failpoint.reached("before_claim")
                self._recheck()
                claim = self.store.claim(
                    self.job_id, self.worker_id, now=self.clock(), settle=pending
                )
                pending = None
                if isinstance(claim, Stop):
                    if not claim.finished:
                        self._stop.set()  # cancelled, or stopped by another worker
                    elif not self._settled():
                        continue
                    return
                if isinstance(claim, Wait):
                    if claim.why is not None:  # a cap or a throttling server: visible
                        if self._wait_visibly(self.clock() + claim.seconds, claim.why):
                            return
                    elif self.sleep(min(claim.seconds, self.heartbeat_interval)):
                        return
                    continue
                assert isinstance(claim, Claimed)
                with self._lock:
                    self._waiting = None  # the claim cleared the job's waiting_for
                outcome = self._deliver(
                    job, provider, composer, claim.delivery, slot, limiter, requests
                )
                if outcome is None:
                    return  # stopped while waiting for the slot: given back untried
                if limiter.unlimited and not self._stop.is_set():
                    pending = outcome
                else:
                    self.store.record(outcome, self.worker_id)
        finally:
            if pending is not None:
                self.store.record(pending, self.worker_id)

    def _recheck(self) -> None:
        """--recheck: the recipients the job's query no longer returns are skipped before
        the next claim (the query runs at most once a minute; see bulkmail.recheck)."""
        if self.recheck is not None:
            self.recheck.check(self.store)

    def _wait_for_slot(self, slot: float, limiter: RateLimiter) -> bool:
        """Wait until ``slot``; a slot missed by more than a sliver of the interval (the
        claim waited for the store's lock, the machine is loaded) is not used late, which
        could put two sends closer than the rate allows: a fresh one is reserved. False
        when a stop interrupted the wait."""
        tolerance = min(0.02, 0.25 / limiter.rate)
        while True:
            if not self._wait_until(slot) or self._stop.is_set():
                return False
            if self.clock() <= slot + tolerance:
                return True
            slot = limiter.reserve()

    def _held_back(self, job: JobRecord) -> tuple[float, str] | None:
        """Whether the job's calendar holds it back now: (until when, why), or None. Past
        ``--not-after`` the job's pending deliveries expire (and the loop finds nothing
        left); before ``--not-before`` or outside every ``--window`` (or too close to a
        window's end to start a delivery) it waits."""
        now = self.clock()
        if job.not_after is not None and now >= job.not_after:
            expired = self.store.expire(self.job_id)
            if expired:
                log.warning(
                    "job %s: --not-after passed: %d deliveries expired", self.job_id, expired
                )
            return None
        schedule = self._schedule or Schedule()
        until: float | None = None
        why = ""
        if job.not_before is not None and now < job.not_before:
            until, why = job.not_before, f"--not-before {_stamp(job.not_before, schedule.tz)}"
        elif not schedule.always_open:
            end = schedule.window_end(now)
            if end <= now or end - now < self.window_margin:
                until = schedule.next_open(max(end, now) + self.window_margin)
                why = f"outside --window {' and '.join(job.windows)}"
        if until is None:
            return None
        if job.not_after is not None and until > job.not_after:
            until = job.not_after  # then what is left expires
        return until, why

    def _wait_visibly(self, until: float, why: str) -> bool:
        """Wait (one heartbeat interval at most, then the loop looks again) while the job
        row says why and until when; True when a stop was requested meanwhile."""
        with self._lock:
            last = self._waiting
            changed = last is None or last[0] != why or abs(last[1] - until) > 1.0
            if changed:
                self._waiting = (why, until)
        if changed:
            self.store.set_waiting(self.job_id, why, until)
            log.info("job %s waiting until %s: %s", self.job_id, _iso(until), why)
            self.on_event(Event("waiting", error=why, until=until))
        return self.sleep(max(0.0, min(until - self.clock(), self.heartbeat_interval)))

    def _wait_until(self, when: float) -> bool:
        """Sleep until ``when``; False when a stop interrupted the wait."""
        delay = when - self.clock()
        return delay <= 0 or not self.sleep(delay)

    def _deliver(
        self,
        job: JobRecord,
        provider: Provider,
        composer: Composer,
        d: DeliveryRecord,
        slot: float | None,
        limiter: RateLimiter,
        requests: RateLimiter | None = None,
    ) -> Outcome | None:
        """Send one claimed delivery; return its outcome (for the caller to commit), or None
        when the job stopped before the send (the delivery is given back untried)."""
        self.on_event(Event("sending", d.email, d.name, attempts=d.attempts))
        try:
            message: Message = build_message(composer, d)
        except BulkmailError as exc:  # e.g. an attachment removed since the job was created
            self.on_event(Event("failed", d.email, d.name, str(exc), d.attempts))
            return Outcome.failed(d.id, str(exc))
        if slot is not None and not self._wait_for_slot(slot, limiter):
            self.store.release(d.id, self.worker_id)
            return None
        if requests is not None and not self._wait_for_request(requests):
            self.store.release(d.id, self.worker_id)
            return None
        self._failpoint.reached("after_claim")
        if not self._still_owner():
            log.warning(
                "job %s: this worker was stopped past its lease and others took over its "
                "deliveries: not sending to %s, stopping",
                self.job_id,
                d.email,
            )
            self._stop.set()
            self.store.release(d.id, self.worker_id)  # untried: out of the caps' log
            return None  # no longer ours: the worker that took it over sends it
        try:
            provider_id = provider.send(message)
        except TransientError as exc:
            return self._transient(job, d, exc)
        except PermanentError as exc:
            self._reset_transient()
            self.on_event(Event("failed", d.email, d.name, str(exc), d.attempts))
            return Outcome.failed(d.id, str(exc))
        except BaseException:  # fatal (abort the job) or a bug: the message was not sent
            self.store.release(d.id, self.worker_id)
            raise
        self._failpoint.reached("after_send")
        self._reset_transient()
        self.on_event(Event("sent", d.email, d.name, attempts=d.attempts))
        return Outcome.sent(d.id, provider_id, self.clock())

    def _wait_for_request(self, requests: RateLimiter) -> bool:
        """Wait for a slot of the provider's request bucket; False when a stop came first."""
        return self._wait_until(requests.reserve()) and not self._stop.is_set()

    # -- batches

    def _batch_loop(
        self,
        job: JobRecord,
        provider: BatchProvider,
        limiter: RateLimiter,
        requests: RateLimiter | None,
        composer: Composer,
    ) -> None:
        """``_send_loop`` a batch at a time: claim up to ``batch_size`` deliveries (at most
        ``burst`` at a finite rate), send them in one request, commit their outcomes
        together (with the next claim when the rate is unlimited)."""
        size = provider.batch_size if limiter.unlimited else min(provider.batch_size, limiter.burst)
        pending: list[Outcome] = []
        try:
            while not self._stop.is_set():
                self._failpoint.reached("before_claim")
                self._recheck()
                claim = self.store.claim_batch(
                    self.job_id,
                    self.worker_id,
                    now=self.clock(),
                    limit=max(1, size),
                    settle=pending,
                )
                pending = []
                if isinstance(claim, Stop):
                    if not claim.finished:
                        self._stop.set()
                    elif not self._settled():
                        continue
                    return
                if isinstance(claim, Wait):
                    if self.sleep(min(claim.seconds, self.heartbeat_interval)):
                        return
                    continue
                assert isinstance(claim, ClaimedBatch)
                outcomes = self._deliver_batch(
                    job, provider, composer, claim.deliveries, limiter, requests
                )
                if limiter.unlimited and not self._stop.is_set():
                    pending = outcomes
                else:
                    self.store.record_many(outcomes, self.worker_id)
        finally:
            if pending:
                self.store.record_many(pending, self.worker_id)

    def _deliver_batch(
        self,
        job: JobRecord,
        provider: BatchProvider,
        composer: Composer,
        batch: Sequence[DeliveryRecord],
        limiter: RateLimiter,
        requests: RateLimiter | None,
    ) -> list[Outcome]:
        """Send claimed deliveries in one request; return their outcomes for the caller to
        commit. Those not sent (the job stopped first, the provider left them out of the
        request, a fatal error) are given back untried; none are returned for them."""
        outcomes: list[Outcome] = []
        ready: list[tuple[DeliveryRecord, Message]] = []
        for d in batch:
            self.on_event(Event("sending", d.email, d.name, attempts=d.attempts))
            try:
                ready.append((d, build_message(composer, d)))
            except BulkmailError as exc:
                self.on_event(Event("failed", d.email, d.name, str(exc), d.attempts))
                outcomes.append(Outcome.failed(d.id, str(exc)))
        if not ready:
            return outcomes
        slot: float | None = None
        if not limiter.unlimited:
            for _ in ready:  # one message slot each; the request goes at the last one
                slot = limiter.reserve()
        if (slot is not None and not self._wait_until(slot)) or self._stop.is_set():
            self._release(d for d, _ in ready)
            return outcomes
        if requests is not None and not self._wait_for_request(requests):
            self._release(d for d, _ in ready)
            return outcomes
        self._failpoint.reached("after_claim")
        if not self._still_owner():  # the fence: right before the batch is handed over
            log.warning(
                "job %s: this worker was stopped past its lease and others took over its "
                "deliveries: not sending a batch of %d, stopping",
                self.job_id,
                len(ready),
            )
            self._stop.set()
            self._release(d for d, _ in ready)  # untried: out of the caps' log
            return []  # no longer ours: the worker that took them over sends them
        try:
            results = provider.send_batch([m for _, m in ready])
        except TransientError as exc:
            if exc.throttled:  # a 429 for the whole request: the account slows down
                outcomes.extend(self._throttled_all(job, [d for d, _ in ready], exc))
                return outcomes
            too_many = self._note_transient()
            outcomes.extend(self._transient_outcome(job, d, exc, too_many) for d, _ in ready)
            if too_many:
                self._pause_after(exc)
            return outcomes
        except PermanentError as exc:  # the request as a whole was refused
            self._reset_transient()
            for d, _ in ready:
                self.on_event(Event("failed", d.email, d.name, str(exc), d.attempts))
                outcomes.append(Outcome.failed(d.id, str(exc)))
            return outcomes
        except BaseException:  # fatal (abort the job) or a bug: nothing was sent
            self._release(d for d, _ in ready)
            raise
        self._failpoint.reached("after_send")
        now = self.clock()
        if any(not isinstance(r, TransientError) for r in results):
            self._reset_transient()
        for (d, _), result in zip(ready, results, strict=False):
            if isinstance(result, TransientError):
                outcomes.append(self._transient_outcome(job, d, result, False))
            elif isinstance(result, PermanentError):
                self.on_event(Event("failed", d.email, d.name, str(result), d.attempts))
                outcomes.append(Outcome.failed(d.id, str(result)))
            else:
                self.on_event(Event("sent", d.email, d.name, attempts=d.attempts))
                outcomes.append(Outcome.sent(d.id, result, now))
        self._release(d for d, _ in ready[len(results) :])  # left out of the request
        return outcomes

    def _release(self, batch: Iterable[DeliveryRecord]) -> None:
        for d in batch:
            self.store.release(d.id, self.worker_id)

    # -- transient failures

    def _reset_transient(self) -> None:
        with self._lock:
            self._consecutive_transient = 0
            self._throttled_since = None

    def _throttled(self, job: JobRecord, d: DeliveryRecord, exc: TransientError) -> Outcome:
        return self._throttled_all(job, [d], exc)[0]

    def _throttled_all(
        self, job: JobRecord, batch: Sequence[DeliveryRecord], exc: TransientError
    ) -> list[Outcome]:
        """The server says the account sends too fast: the account's shared limiter
        pauses (Retry-After, account-wide) and slows, once for the whole request; each
        delivery goes back to pending without using up a retry and without counting towards
        the consecutive transient failures. The job pauses only when nothing got through
        for ``throttle_pause``."""
        self.store.throttle(job.account, retry_after=exc.retry_after, clock=self.clock)
        now = self.clock()
        with self._lock:
            if self._throttled_since is None:
                self._throttled_since = now
            stuck = now - self._throttled_since >= self.throttle_pause
        for d in batch:
            self.on_event(Event("retry", d.email, d.name, str(exc), d.attempts))
        if stuck:
            self.request_stop(
                "paused",
                f"throttled by the server: nothing got through for "
                f"{self.throttle_pause:g} s (last: {exc})",
            )
        return [
            Outcome.retry(d.id, str(exc), now, exc.outcome_unknown, attempts=max(0, d.attempts - 1))
            for d in batch
        ]

    def _note_transient(self) -> bool:
        """Count one transient failure in a row; True when that makes too many."""
        with self._lock:
            self._consecutive_transient += 1
            return self._consecutive_transient >= self.max_consecutive_transient

    def _pause_after(self, exc: TransientError) -> None:
        self.request_stop(
            "paused",
            f"{self.max_consecutive_transient} consecutive transient failures (last: {exc})",
        )

    def _transient(self, job: JobRecord, d: DeliveryRecord, exc: TransientError) -> Outcome:
        if exc.throttled:
            return self._throttled(job, d, exc)
        too_many = self._note_transient()
        outcome = self._transient_outcome(job, d, exc, too_many)
        if too_many:
            self._pause_after(exc)
        return outcome

    def _transient_outcome(
        self, job: JobRecord, d: DeliveryRecord, exc: TransientError, too_many: bool
    ) -> Outcome:
        """Retry later (in doubt when the outcome is unknown), or fail after too many
        attempts; ``too_many``: this failure pauses the job, which leaves it pending."""
        error = str(exc)
        # an unreachable server (or one that turned the request away for its rate limit)
        # tried nobody: the attempt is given back, so a server that is down pauses the job
        # instead of failing its recipients one by one
        attempts = d.attempts - 1 if exc.untried else d.attempts
        if attempts > job.max_retries and not too_many:
            error = f"gave up after {d.attempts} attempts: {error}"
            outcome = Outcome.failed(d.id, error)
            self.on_event(Event("failed", d.email, d.name, error, d.attempts))
        else:  # (the failure that pauses the job leaves its recipient pending)
            delay = backoff_delay(max(1, attempts), job.backoff, exc.retry_after)
            outcome = Outcome.retry(
                d.id,
                error,
                self.clock() + delay,
                exc.outcome_unknown,
                attempts=attempts if exc.untried else None,
            )
            self.on_event(Event("retry", d.email, d.name, error, d.attempts, retry_in=delay))
        return outcome


class _Failpoint:
    """Crash-test hook: ``BULKMAIL_FAILPOINT=after_claim:3`` kills this process with SIGKILL
    the third time the send loop reaches that point, exactly as ``kill -9`` would there;
    ``after_claim:3:STOP`` stops it there with SIGSTOP instead (a frozen worker, which the
    test continues with SIGCONT).

    Points: ``before_claim`` (slot taken, nothing claimed), ``after_claim`` (``sending``
    committed, provider not called), ``after_send`` (the server accepted the message,
    ``sent`` not yet committed). Unset (always, outside crash tests): a no-op.
    """

    def __init__(self, point: str | None, count: int, sig: signal.Signals = signal.SIGKILL) -> None:
        self.point = point
        self.count = count
        self.signal = sig
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> _Failpoint:
        spec = os.environ.get("BULKMAIL_FAILPOINT", "")
        point, _, rest = spec.partition(":")
        count, _, name = rest.partition(":")
        sig = signal.SIGSTOP if name.upper() == "STOP" else signal.SIGKILL
        return cls(point or None, int(count or 1), sig)

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self.count -= 1
            if self.count <= 0 and self.signal == signal.SIGKILL:
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.count == 0:
                # to this very thread: it stops on its way out of the call, before it runs
                # one more line (sent to the process, another thread may take the signal
                # and this one runs on a moment)
                signal.pthread_kill(threading.get_ident(), self.signal)
