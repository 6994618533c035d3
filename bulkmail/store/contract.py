"""The job store's contract: what every backend guarantees, as typed Protocols.

``StoreReader`` is the read subset (``status``, ``recent``, ``report``), served by the full
store and by the light SQLite reader of :mod:`bulkmail.store.readonly`. ``JobStore`` is the whole
store the send loop, the jobs and the commands are typed against; :class:`bulkmail.store.sql.
Store` implements it on SQLite and PostgreSQL, and ``tests/test_store_contract.py`` is the
one test suite every backend passes.

Every write runs in ONE short transaction (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL the
job row is locked ``FOR UPDATE`` whenever who runs the job changes), and a read runs in one
read transaction: one consistent snapshot. Times are POSIX seconds. Worker leases and rate
slots use the STORE's time, read in the transaction that needs it (the database's clock on
a server store, so hosts whose clocks disagree still agree on who is alive and on the rate);
a ``now`` the caller passes overrides it (fixed times in tests; on SQLite, one host, the
caller's clock is the store's time). Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from bulkmail.store.records import (
    BatchClaimResult,
    ClaimResult,
    Counts,
    DeliveryRecord,
    EventSummary,
    EventView,
    HistoryRecord,
    JobRecord,
    JobView,
    NewDelivery,
    NewEvent,
    NewJob,
    Outcome,
    Reclaimed,
    Registration,
    Suppression,
    TokenRecord,
    WorkerAlive,
)

__all__ = ["JobStore", "StoreReader"]


class StoreReader(Protocol):
    """The reads of a job store. Each call is one read transaction; nothing is changed."""

    @property
    def location(self) -> str:
        """Where the store is, for messages (never shows a password)."""
        ...

    def get_job(self, job_id: int) -> JobRecord:
        """The job; ``JobNotFound`` when there is none."""
        ...

    def counts(self, job_id: int) -> Counts:
        """The job's deliveries counted by state, and how many are in doubt."""
        ...

    def view(self, job_id: int) -> JobView:
        """The job, its counts and its workers (oldest first), from one snapshot."""
        ...

    def recent(self, limit: int) -> list[JobView]:
        """The newest ``limit`` jobs, newest first, each as ``view`` gives it."""
        ...

    def taken_under(self, dedupe_key: str) -> dict[str, tuple[int, str]]:
        """The addresses (lower-cased) a new job under ``dedupe_key`` would skip, each with
        the job and the delivery state that hold it (``records.dedupe_reason``)."""
        ...

    def history(self, email: str) -> list[HistoryRecord]:
        """Every delivery to ``email`` (matched case-insensitively, as dedupe matches) in
        every job, with the job's name, subject and dedupe key; oldest job first, then in
        the job's order."""
        ...

    def deliveries(
        self, job_id: int, *, states: Sequence[str] | None = None, batch: int = 1000
    ) -> Iterator[DeliveryRecord]:
        """The job's deliveries (only those in ``states`` when given) in position order,
        read ``batch`` at a time, each batch in its own read transaction."""
        ...

    def job_events(
        self,
        job_id: int,
        *,
        kinds: Sequence[str] | None = None,
        positions: tuple[int, int] | None = None,
    ) -> list[EventView]:
        """The events recorded against the job's deliveries, oldest first: only ``kinds``
        when given; only deliveries at positions ``after < p <= upto`` for
        ``positions=(after, upto)`` (the report reads them a batch of deliveries at a time)."""
        ...

    def suppressions(self) -> list[Suppression]:
        """The suppression list, oldest first."""
        ...

    def suppression(self, email: str) -> Suppression | None:
        """The suppression list's entry for ``email`` (any case), or None."""
        ...

    def account_sends(self, account: str, *, since: float) -> list[float]:
        """When the account's messages counted by its caps (the ``sends`` log: sent, in
        flight, in doubt or refused, by any job) went out after ``since``, oldest first:
        what a new job's calendar starts from."""
        ...


class JobStore(StoreReader, Protocol):
    """The whole job store: job lifecycle, worker leases, claims, rate slots and reads."""

    @property
    def url(self) -> str:
        """The store's URL to hand to a worker process (it may hold a password)."""
        ...

    @property
    def server(self) -> bool:
        """Whether it is a server database that workers on several hosts may share."""
        ...

    def close(self) -> None:
        """Release the store's connections."""
        ...

    # -- job lifecycle

    def create_job(
        self,
        new: NewJob,
        recipients: Iterable[NewDelivery],
        *,
        now: float,
        domain: str,
        include_suppressed: bool = False,
    ) -> int:
        """Create a job and every delivery, streaming ``recipients`` in batches, each its own
        short write transaction, under the state ``creating`` (no worker runs it), then make
        it ``queued``; an exception while iterating them deletes what was written (no job is
        left). A process killed meanwhile leaves a ``creating`` job, which never runs.
        Each delivery gets its Message-ID (``records.message_id``); it is ``pending``, or
        ``skipped`` with its reason: the recipient's own ``skip_reason``, or an address
        taken under the job's dedupe key (see ``taken_under``), or an address on the
        suppression list (the reason says why it is there: ``records.suppression_reason``)
        unless ``include_suppressed`` (or ``new.include_suppressed``), which the job records
        for its claims. Returns the job's id."""
        ...

    def set_log_path(self, job_id: int, path: str) -> None:
        """Record where a background worker of the job writes its log."""
        ...

    def cancel(self, job_id: int, *, now: float, alive: WorkerAlive | None = None) -> int:
        """Cancel the job (``JobStateError`` if completed or cancelled already), in one
        transaction holding the job row: ``pending`` deliveries, and those left ``sending``
        by workers ``alive`` says are gone, become ``cancelled``; a live worker's message in
        flight gets its outcome. Returns how many deliveries were cancelled."""
        ...

    def retry_failed(self, job_id: int) -> int:
        """Put the job's ``failed`` deliveries back to ``pending`` with no attempts, in one
        transaction; a ``completed`` job becomes ``queued`` again, a cancelled one is
        refused (``JobStateError``). Returns how many were put back."""
        ...

    # -- worker leases

    def register_worker(
        self,
        job_id: int,
        *,
        worker_id: str,
        host: str,
        pid: int,
        now: float | None = None,
        alive: WorkerAlive,
        exclusive: bool = True,
        host_id: str | None = None,
    ) -> Registration:
        """Register a worker and make the job ``running``, in one transaction holding the
        job row. ``host_id`` says which host (machine, boot, pid namespace) its pid belongs
        to; ``alive`` judges the job's workers as read with the store's time (``read_at``).
        Refuses (``JobStateError``) a completed or cancelled job and, when
        ``exclusive``, one a live worker holds. Gone workers are marked stopped and their
        ``sending`` deliveries go back to ``pending`` in doubt (resent, same Message-ID)."""
        ...

    def heartbeat(self, worker_id: str, *, now: float | None = None) -> str:
        """Renew the worker's heartbeat (at the store's time); return its job's state, or
        ``WORKER_STOPPED`` when other workers took it for gone (it must stop before its next
        message; a stopped worker's heartbeat is not renewed). A renewal never crosses a
        take-over: once it answers the job's state, the worker is not taken for gone before
        its heartbeat is ``stale_after`` old by the store's clock."""
        ...

    def reclaim(
        self, job_id: int, *, worker_id: str, now: float | None = None, alive: WorkerAlive
    ) -> Reclaimed:
        """Take over the deliveries of the job's gone workers (``alive`` says which; the
        caller always counts as alive): their ``sending`` deliveries go back to ``pending``
        in doubt and they are marked stopped. A plain read when nobody is gone; only a
        ``running`` job is touched. Also says how many others still hold in ``sending``."""
        ...

    def finish_worker(
        self,
        worker_id: str,
        *,
        now: float,
        stop: str | None,
        error: str | None,
        local: bool | None = None,
        alive: WorkerAlive | None = None,
    ) -> str:
        """Mark the worker stopped and settle the job's state in one transaction holding
        the job row; return the job's new state. ``stop`` (``paused``/``aborted``, with
        ``error``) applies to the whole job, except a ``local`` one (the worker's own
        trouble; default: ``paused`` is local, ``aborted`` is not) while another worker
        ``alive`` says is live (default: any not stopped) remains: then this worker just
        leaves. Otherwise a job with nothing pending or sending becomes ``completed``, and
        the last worker out of one with work left pauses it."""
        ...

    # -- claims

    def next_due(self, job_id: int, *, now: float) -> float | None:
        """Seconds until the job's next ``pending`` delivery is due (0: now), or None when
        nothing is pending. A plain read: no lock."""
        ...

    def claim(
        self, job_id: int, worker_id: str, *, now: float, settle: Outcome | None = None
    ) -> ClaimResult:
        """In one write transaction: commit ``settle`` (the worker's previous outcome, as
        ``record``), then claim the next due ``pending`` delivery: ``sending``, one attempt
        more, under ``worker_id`` (skipping, as ``skipped`` with the reason, an address put
        on the suppression list since the job was created, unless the job includes
        suppressed addresses, and an address another job under the dedupe key has sent or
        is sending). ``Wait`` when nothing is due yet, ``Stop`` when
        the job is not running, the worker was taken for gone, or nothing is left.

        The account's caps hold in the same transaction, holding the account's bucket row:
        every claim on the account (any job, process or host) is logged with the store's
        time, and with the job's ``per_hour``/``per_day`` reached in the rolling hour/day
        (or the account paused by ``throttle``) the answer is ``Wait`` until the oldest
        send leaves the window, with ``why``. A claim stays in that log while in flight, in
        doubt, sent (re-timed to when it went out) or refused (failed, retried after a
        server's error: anything the provider may have counted), and leaves it only when
        given back untried: ``release``, or an outcome ``given_back`` (the server was not
        reached, or refused it as too fast)."""
        ...

    def claim_batch(
        self,
        job_id: int,
        worker_id: str,
        *,
        now: float,
        limit: int,
        settle: Sequence[Outcome] = (),
    ) -> BatchClaimResult:
        """``claim`` for several deliveries at once (a provider's batch request): in one
        write transaction commit ``settle`` (the worker's previous outcomes), then claim up
        to ``limit`` due ``pending`` deliveries in the order ``claim`` takes them, each
        ``sending`` with one attempt more under ``worker_id`` before the request goes out
        (suppressed addresses and those taken under the dedupe key become ``skipped``, as
        in ``claim``).
        ``ClaimedBatch`` with at least one delivery, else ``Wait`` or ``Stop`` as ``claim``."""
        ...

    def record_many(self, outcomes: Sequence[Outcome], worker_id: str) -> int:
        """Commit several deliveries' outcomes (a batch's) in one transaction, each as
        ``record`` does; returns how many were still this worker's and were changed."""
        ...

    def record(self, outcome: Outcome, worker_id: str) -> bool:
        """Commit one delivery's outcome in one transaction; False (and nothing changed)
        when the delivery is no longer this worker's. A ``sent`` counts for the worker; one
        handed back to ``pending`` in a cancelled job becomes ``cancelled``."""
        ...

    def release(self, delivery_id: int, worker_id: str) -> bool:
        """Give a claimed delivery back untried (``pending``, the attempt not counted; or
        ``cancelled`` in a cancelled job). False when it is no longer this worker's. Either
        way the worker's claim of it leaves the account's caps log (the caller never handed
        it to the provider): a worker fenced off after others took the delivery over calls
        this too."""
        ...

    # -- the calendar, the caps and throttling (issue 12)

    def set_waiting(self, job_id: int, why: str | None, until: float | None) -> None:
        """Record why a worker holds the job back (a cap, a window, --not-before, a
        throttling server) and until when (POSIX seconds, UTC); None clears it. A claim
        that takes a delivery clears it too."""
        ...

    def expire(self, job_id: int) -> int:
        """The job's ``--not-after`` has passed: its ``pending`` deliveries become
        ``expired`` (terminal, never sent), in one transaction; returns how many."""
        ...

    def skip_pending(self, job_id: int, emails: Iterable[str], reason: str) -> int:
        """The job's ``pending`` deliveries to ``emails`` (lower-cased addresses) become
        ``skipped`` with ``reason`` (``--recheck``); returns how many."""
        ...

    def due_jobs(self, *, now: float | None = None) -> list[int]:
        """The ids of the jobs ``bulkmail run-due`` starts a worker for (oldest first):
        ``scheduled`` with ``not_before`` passed (store's time), ``queued``, and ``running``
        (whose workers may be gone; a live worker refuses a second exclusive one)."""
        ...

    def throttle(
        self,
        key: str,
        *,
        retry_after: float | None,
        now: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> float:
        """A server refused the account ``key`` for sending too fast: no claim of any job
        on the account succeeds before the pause ends (``retry_after`` seconds, else a
        short default; claims answer ``Wait`` with the reason), and the account's rate
        factor halves (GCRA slots come slower, recovering gradually). Returns the pause."""
        ...

    # -- after the send

    def record_events(
        self,
        new_events: Sequence[NewEvent],
        *,
        now: float,
        processed_keys: Sequence[str] = (),
        note: str | None = None,
    ) -> EventSummary:
        """Record events about sent messages (webhooks, bounces) in ONE write transaction,
        with ``processed_keys`` (the bounce message they came from) marked processed in it.
        Each event is matched to its delivery (``NewEvent``); an ``event_id`` seen before
        changes nothing (a duplicate). A ``delivery`` event for a delivery in doubt and not
        in flight (``pending``/``failed``) makes it ``sent``, so it is never resent; hard
        bounces, spam complaints and unsubscribes put the address on the suppression list
        (the first reason stays)."""
        ...

    def processed_among(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` already marked processed by ``record_events``."""
        ...

    def add_suppression(
        self,
        email: str,
        *,
        reason: str,
        now: float,
        job_id: int | None = None,
        detail: str | None = None,
    ) -> Suppression | None:
        """Put ``email`` on the suppression list: None when added, else the entry already
        there (left as it is)."""
        ...

    def remove_suppression(self, email: str) -> bool:
        """Take ``email`` off the suppression list; False when it was not on it."""
        ...

    # -- API tokens (bulkmail.web.auth): only a hash of each token is stored

    def add_token(self, name: str, token_hash: str, role: str, *, now: float) -> None:
        """Record a token under ``name`` with ``role`` (one of ``records.ROLES``); a name
        already taken, or another role, is ``InputError`` and nothing is written."""
        ...

    def remove_token(self, name: str) -> bool:
        """Revoke the token named ``name`` (its sessions end with it); False when there is
        none."""
        ...

    def tokens(self) -> list[TokenRecord]:
        """Every token's record (never the token itself), by name."""
        ...

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        """The token whose SHA-256 (hex) is ``token_hash``, or None."""
        ...

    # -- rate slots

    def reserve_slot(
        self, key: str, reserve: Callable[[float | None], tuple[float, float]]
    ) -> float:
        """One GCRA step on the shared bucket ``key`` in one write transaction holding its
        row: ``reserve(tat) -> (slot, new_tat)`` computes, the new TAT is stored (the row
        created on first use, once however many workers race), the slot is returned."""
        ...

    def reserve_delay(
        self, key: str, rate: float, burst: int, *, clock: Callable[[], float] | None = None
    ) -> float:
        """One GCRA step at ``rate`` and ``burst`` on the shared bucket ``key``, computed at
        the store's time inside the transaction holding the bucket's row (``clock``, the
        caller's, where the store's time is the local one); returns the seconds the caller
        waits, on its own clock, before it sends."""
        ...
