"""The job store's operations on what happens after the send, and its API tokens: delivery
events (webhooks, ``events import``, bounces), the suppression list, the bounce messages
already read, the HTTP API's tokens. ``AfterSend`` is a mixin of ``sql.Store``, which gives
it its transactions (``_write``, ``_read``, ``_reading``) and ``server``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from bulkmail.errors import InputError
from bulkmail.store.reads import SQL_TOKEN_BY_HASH, SQL_TOKENS, Query, suppression_from_row
from bulkmail.store.records import (
    ROLES,
    SUPPRESSING,
    DeliveryState,
    EventKind,
    EventSummary,
    NewEvent,
    Suppression,
    TokenRecord,
    parse_message_id,
)
from bulkmail.store.schema import api_tokens, deliveries, events, processed, suppressions

__all__ = ["AfterSend"]

_PENDING = DeliveryState.PENDING


class AfterSend:
    """Events, the suppression list, processed bounce messages and API tokens: the part of
    ``contract.JobStore`` that ``sql.Store`` takes from here."""

    server: bool  # PostgreSQL (else SQLite)

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _reading(self) -> AbstractContextManager[Query]:
        raise NotImplementedError

    # -- after the send: events, the suppression list, processed bounce messages

    def _insert_ignore(self, table: sa.Table, key: str) -> Any:
        """An INSERT that does nothing when the row's ``key`` is taken (both backends); it
        returns the key when it inserted (``_inserted``: the drivers' rowcounts of such an
        insert are not reliable)."""
        insert = pg_insert if self.server else sqlite_insert
        return (
            insert(table)
            .on_conflict_do_nothing(index_elements=[table.c[key]])
            .returning(table.c[key])
        )

    @staticmethod
    def _inserted(conn: Connection, statement: Any) -> int:
        """1 when ``statement`` (an ``_insert_ignore``) inserted its row, else 0."""
        return 0 if conn.execute(statement).first() is None else 1

    def record_events(
        self,
        new_events: Sequence[NewEvent],
        *,
        now: float,
        processed_keys: Sequence[str] = (),
        note: str | None = None,
    ) -> EventSummary:
        """Record events in ONE write transaction (with ``processed_keys`` marked processed
        in it, for a bounce message: it is read once, whatever happens). Each event is
        matched to its delivery; one whose ``event_id`` is recorded already changes
        nothing. A ``delivery`` event for a delivery in doubt that is not in flight
        (``pending`` or ``failed``) marks it ``sent``: it is not sent again. Hard bounces,
        spam complaints and unsubscribes put the address on the suppression list."""
        summary = EventSummary()
        with self._write() as conn:
            for ev in new_events:
                self._record_event(conn, ev, now, summary)
            for key in processed_keys:
                self._inserted(
                    conn, self._insert_ignore(processed, "key").values(key=key, at=now, note=note)
                )
        return summary

    def _record_event(
        self, conn: Connection, ev: NewEvent, now: float, summary: EventSummary
    ) -> None:
        match = self._match_delivery(conn, ev)
        job_id, delivery_id, email = match if match else (None, None, ev.email)
        inserted = self._inserted(
            conn,
            self._insert_ignore(events, "event_id").values(
                event_id=ev.event_id,
                job_id=job_id,
                delivery_id=delivery_id,
                kind=ev.kind,
                email=email,
                at=ev.at,
                recorded_at=now,
                source=ev.source,
                detail=ev.detail,
            ),
        )
        if not inserted:
            summary.duplicates += 1
            return
        summary.recorded += 1
        if match is None:
            summary.unmatched += 1
        if delivery_id is not None and ev.kind == EventKind.DELIVERY:
            confirmed = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.id == delivery_id,
                    deliveries.c.in_doubt,
                    deliveries.c.state.in_((_PENDING, DeliveryState.FAILED)),
                )
                .values(
                    state=DeliveryState.SENT,
                    sent_at=ev.at,
                    last_error=None,
                    provider_message_id=sa.func.coalesce(
                        deliveries.c.provider_message_id, ev.provider_message_id
                    ),
                )
            ).rowcount
            summary.confirmed += confirmed
        reason = SUPPRESSING.get(ev.kind)  # type: ignore[call-overload]
        if reason is not None and email:
            summary.suppressed += self._inserted(
                conn,
                self._insert_ignore(suppressions, "email_key").values(
                    email_key=email.lower(),
                    email=email,
                    reason=reason,
                    at=ev.at,
                    job_id=job_id,
                    detail=ev.detail,
                ),
            )

    def _match_delivery(self, conn: Connection, ev: NewEvent) -> tuple[int, int, str] | None:
        """(job, delivery, address) of the delivery ``ev`` is about: by its delivery id
        (in its job), else its Message-ID, else the provider's message id; the address
        must be the delivery's when the event names one."""
        cols = (deliveries.c.job_id, deliveries.c.id, deliveries.c.email)
        wanted = ev.email.strip().lower()
        candidates: list[sa.Select[Any]] = []
        if ev.delivery_id is not None:
            q = sa.select(*cols).where(deliveries.c.id == ev.delivery_id)
            if ev.job_id is not None:
                q = q.where(deliveries.c.job_id == ev.job_id)
            candidates.append(q)
        parsed = parse_message_id(ev.message_id) if ev.message_id else None
        if parsed is not None:
            # by job and position (the unique index), then the job's token must agree: a
            # VERP token gives job.position.token without the Message-ID's domain
            job_id, position, token = parsed
            found = conn.execute(
                sa.select(*cols, deliveries.c.message_id).where(
                    deliveries.c.job_id == job_id, deliveries.c.position == position
                )
            ).first()
            stored = parse_message_id(str(found[3])) if found is not None else None
            if (
                found is not None
                and stored is not None
                and stored[2] == token
                and (not wanted or str(found[2]).lower() == wanted)
            ):
                return int(found[0]), int(found[1]), str(found[2])
        if ev.provider_message_id:
            candidates.append(
                sa.select(*cols)
                .where(deliveries.c.provider_message_id == ev.provider_message_id)
                .order_by(deliveries.c.id.desc())
                .limit(1)
            )
        for q in candidates:
            row = conn.execute(q).first()
            if row is not None and (not wanted or str(row[2]).lower() == wanted):
                return int(row[0]), int(row[1]), str(row[2])
        return None

    def processed_among(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` (bounce messages) were processed already."""
        if not keys:
            return set()
        with self._read() as conn:
            rows = conn.execute(sa.select(processed.c.key).where(processed.c.key.in_(keys)))
            return {str(k) for (k,) in rows}

    def add_suppression(
        self,
        email: str,
        *,
        reason: str,
        now: float,
        job_id: int | None = None,
        detail: str | None = None,
    ) -> Suppression | None:
        """Put ``email`` on the suppression list; None when it was added, else the entry
        already there (unchanged)."""
        key = email.strip().lower()
        with self._write() as conn:
            added = self._inserted(
                conn,
                self._insert_ignore(suppressions, "email_key").values(
                    email_key=key,
                    email=email.strip(),
                    reason=reason,
                    at=now,
                    job_id=job_id,
                    detail=detail,
                ),
            )
            if added:
                return None
            row = conn.execute(sa.select(suppressions).where(suppressions.c.email_key == key))
            return suppression_from_row(dict(row.mappings().one()))

    def remove_suppression(self, email: str) -> bool:
        """Take ``email`` off the suppression list; False when it was not on it."""
        with self._write() as conn:
            removed = conn.execute(
                suppressions.delete().where(suppressions.c.email_key == email.strip().lower())
            ).rowcount
        return bool(removed)

    # -- API tokens

    def add_token(self, name: str, token_hash: str, role: str, *, now: float) -> None:
        if role not in ROLES:
            raise InputError(f"--role: must be one of {', '.join(ROLES)}, got {role!r}")
        with self._write() as conn:
            taken = conn.execute(
                sa.select(api_tokens.c.name).where(api_tokens.c.name == name)
            ).first()
            if taken is not None:
                raise InputError(
                    f"a token named {name!r} exists already; remove it first "
                    f"(bulkmail token remove {name})"
                )
            conn.execute(
                api_tokens.insert().values(
                    name=name, token_hash=token_hash, role=role, created_at=now
                )
            )

    def remove_token(self, name: str) -> bool:
        with self._write() as conn:
            removed = conn.execute(api_tokens.delete().where(api_tokens.c.name == name))
            return bool(removed.rowcount)

    def tokens(self) -> list[TokenRecord]:
        with self._reading() as query:
            return [TokenRecord(**row) for row in query(SQL_TOKENS, {})]

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        with self._reading() as query:
            rows = query(SQL_TOKEN_BY_HASH, {"hash": token_hash})
        return TokenRecord(**rows[0]) if rows else None
