"""Delivery events: Mailtrap's webhook payloads read into ``NewEvent`` records, their
signature checked, and recorded against the deliveries they are about (``bulkmail serve``
and ``bulkmail events import``).

A payload is ``{"events": [...]}`` or JSON Lines (one event object a line); each event has
``event``, ``timestamp``, ``email``, ``message_id`` (Mailtrap's), ``event_id`` (what a
second delivery of the same event is recognised by) and ``custom_variables``: bulkmail sends
``bulkmail_job`` and ``bulkmail_delivery`` there, which find the delivery; without them the
provider's message id does. Bounces add ``response``, ``response_code`` and
``bounce_category``; rejects and suspensions a ``reason``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bulkmail.errors import InputError, file_error
from bulkmail.store.contract import JobStore
from bulkmail.store.records import EventKind, EventSummary, NewEvent

__all__ = [
    "KNOWN_KINDS",
    "MAX_EVENTS_PER_WRITE",
    "import_events",
    "parse_payload",
    "record",
    "sign",
    "signature_ok",
]

KNOWN_KINDS = frozenset(str(k) for k in EventKind)
MAX_EVENTS_PER_WRITE = 500  # a Mailtrap POST carries at most 500 events: one transaction


def sign(secret: str, body: bytes) -> str:
    """The ``Mailtrap-Signature`` of ``body``: hex HMAC-SHA256 with the signing secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of the RAW ``body`` (compared in constant time);
    never true without a secret or a header."""
    if not secret or not header:
        return False
    return hmac.compare_digest(sign(secret, body), header.strip().lower())


def _objects(body: bytes, where: str) -> Iterator[Mapping[str, Any]]:
    """The event objects of a payload: ``{"events": [...]}``, a JSON array, or JSON Lines."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    stripped = text.strip()
    if not stripped:
        return
    try:
        whole: Any = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None  # JSON Lines (or garbage: said line by line below)
    else:
        if isinstance(whole, dict) and isinstance(whole.get("events"), list):
            items: list[Any] = whole["events"]
        elif isinstance(whole, list):
            items = whole
        elif isinstance(whole, dict):
            items = [whole]  # JSON Lines of one line
        else:
            raise InputError(f'{where}: expected {{"events": [...]}} or JSON Lines')
        for n, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise InputError(f"{where}: event {n} is not an object")
            yield item
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: line {n}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: line {n}: not an event object")
        yield item


def _int(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _detail(item: Mapping[str, Any]) -> str | None:
    """The server's words about a bounce, reject or suspension, on one line."""
    response = item.get("response") or item.get("reason")
    parts = []
    if response:
        parts.append(str(response))
    elif item.get("response_code"):
        parts.append(str(item["response_code"]))
    if item.get("bounce_category"):
        parts.append(f"({item['bounce_category']})")
    text = " ".join(" ".join(parts).split())
    return text or None


def to_event(item: Mapping[str, Any], *, now: float) -> NewEvent | None:
    """One Mailtrap event object as a ``NewEvent``; None for a kind bulkmail does not know."""
    kind = str(item.get("event", "")).strip().lower()
    if kind not in KNOWN_KINDS:
        return None
    event_id = str(item.get("event_id") or "").strip()
    if not event_id:  # Mailtrap always sends one; a hand-made file may not
        canonical = json.dumps(item, sort_keys=True, ensure_ascii=False).encode("utf-8")
        event_id = "sha256:" + hashlib.sha256(canonical).hexdigest()
    stamp = item.get("timestamp")
    try:
        at = float(stamp) if stamp is not None else now
    except (TypeError, ValueError):
        at = now
    variables = item.get("custom_variables")
    variables = variables if isinstance(variables, dict) else {}
    provider_id = item.get("message_id")
    return NewEvent(
        event_id=f"mailtrap:{event_id}",
        kind=kind,
        email=str(item.get("email") or "").strip(),
        at=at,
        source="mailtrap",
        detail=_detail(item),
        job_id=_int(variables.get("bulkmail_job")),
        delivery_id=_int(variables.get("bulkmail_delivery")),
        provider_message_id=str(provider_id).strip() if provider_id else None,
    )


def parse_payload(
    body: bytes, *, where: str = "payload", now: float | None = None
) -> list[NewEvent]:
    """The events of a webhook body or file (``InputError`` naming ``where`` when it is not
    one); events of kinds bulkmail does not know are left out."""
    at = time.time() if now is None else now
    found = (to_event(item, now=at) for item in _objects(body, where))
    return [e for e in found if e is not None]


def record(
    store: JobStore, new_events: Sequence[NewEvent], *, now: float | None = None
) -> EventSummary:
    """Record events in write transactions of at most ``MAX_EVENTS_PER_WRITE``."""
    at = time.time() if now is None else now
    summary = EventSummary()
    for start in range(0, len(new_events), MAX_EVENTS_PER_WRITE):
        chunk = new_events[start : start + MAX_EVENTS_PER_WRITE]
        summary.add(store.record_events(chunk, now=at))
    return summary


def import_events(store: JobStore, path: Path, *, now: float | None = None) -> EventSummary:
    """``bulkmail events import FILE``: the events of a file (JSON or JSON Lines, as a
    webhook would have posted them), deduplicated like the webhook's."""
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise file_error(str(path), exc, "a JSON or JSON Lines file") from None
    return record(store, parse_payload(body, where=str(path), now=now), now=now)
