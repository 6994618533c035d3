"""Bounces by SMTP: RFC 3464 delivery status notifications read from a Maildir or an IMAP
mailbox (``bulkmail bounces``), matched to their deliveries and recorded as events.

A DSN is ``multipart/report; report-type=delivery-status``: a ``message/delivery-status``
part (one block about the message, then one per recipient: ``Final-Recipient``,
``Action``, ``Status``, ``Diagnostic-Code``) and usually the returned message or its
headers (``message/rfc822``, ``text/rfc822-headers``), whose ``Message-ID`` is bulkmail's
``<bulkmail.JOB.POSITION.TOKEN@domain>``. With an opt-in VERP return path
(``bounces+{token}@example.edu``) the token in the address the DSN was sent to is
``JOB.POSITION.TOKEN``. A 5.x.x status is a hard ``bounce`` (the address is suppressed), a
4.x.x one (or ``Action: delayed``) a ``soft bounce``.

Every message read is marked processed in the store (Maildir: by file name and Message-ID;
IMAP: by Message-ID, else by mailbox, UIDVALIDITY and UID) in the transaction that records
its events, so a second run adds nothing. The mailbox itself is never changed.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bulkmail.errors import ConfigError, InputError
from bulkmail.providers.tls import client_context, plaintext_problem
from bulkmail.store.contract import JobStore
from bulkmail.store.records import EventKind, EventSummary, NewEvent

__all__ = [
    "BounceRun",
    "Dsn",
    "ImapSource",
    "parse_dsn",
    "process",
    "read_imap",
    "read_maildir",
    "verp_pattern",
]


@dataclass(frozen=True)
class RecipientStatus:
    recipient: str
    action: str
    status: str
    diagnostic: str | None


@dataclass(frozen=True)
class Dsn:
    """What a delivery status notification says."""

    message_id: str | None  # the DSN's own
    original_message_id: str | None  # the returned message's
    to: tuple[str, ...]  # where the DSN was sent (the VERP return path, when used)
    date: float | None
    recipients: tuple[RecipientStatus, ...]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _address(value: str | None) -> str:
    """``rfc822; user@example.edu`` -> ``user@example.edu``."""
    if not value:
        return ""
    _, _, address = str(value).rpartition(";")
    return address.strip().strip("<>")


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a ``message/delivery-status`` part (the email package parses
    each block as a message of headers)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    return [HeaderParser().parsestr(block) for block in re.split(r"\r?\n\s*\r?\n", text) if block]


def _returned_message_id(msg: Message) -> str | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822" or ctype == "message/rfc822-headers":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                found = inner[0].get("Message-ID")
                if found:
                    return str(found).strip()
        if ctype == "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                headers = BytesHeaderParser().parsebytes(raw)
                found = headers.get("Message-ID")
                if found:
                    return str(found).strip()
    return None


def parse_dsn(raw: bytes) -> Dsn | None:
    """The DSN in ``raw`` (an RFC 5322 message), or None when it is not one."""
    msg = message_from_bytes(raw, policy=policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return None
    if str(msg.get_param("report-type", "")).lower() != "delivery-status":
        return None
    status_part = next(
        (p for p in msg.walk() if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return None
    recipients = []
    for block in _blocks(status_part)[1:]:  # the first block is about the whole message
        recipient = _address(block.get("Final-Recipient") or block.get("Original-Recipient"))
        if not recipient:
            continue
        diagnostic = block.get("Diagnostic-Code")
        if diagnostic:
            kind, _, text = str(diagnostic).partition(";")
            diagnostic = _one_line(text if text else kind)
        recipients.append(
            RecipientStatus(
                recipient=recipient,
                action=str(block.get("Action", "")).strip().lower(),
                status=str(block.get("Status", "")).strip(),
                diagnostic=diagnostic or None,
            )
        )
    date = None
    if msg.get("Date"):
        try:
            date = parsedate_to_datetime(str(msg["Date"])).timestamp()
        except (TypeError, ValueError):
            date = None
    to = tuple(
        _address(str(v))
        for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To")
        for v in (msg.get_all(name) or [])
    )
    own = msg.get("Message-ID")
    return Dsn(
        message_id=str(own).strip() if own else None,
        original_message_id=_returned_message_id(msg),
        to=tuple(t for t in to if t),
        date=date,
        recipients=tuple(recipients),
    )


def verp_pattern(template: str) -> re.Pattern[str]:
    """The regex of a VERP return path template such as ``bounces+{token}@example.edu``."""
    if template.count("{token}") != 1:
        raise InputError(f"--return-path {template!r}: must hold {{token}} exactly once")
    before, after = template.split("{token}")
    return re.compile(
        re.escape(before) + r"(?P<token>\d+[.=]\d+[.=][0-9a-fA-F]+)" + re.escape(after),
        re.IGNORECASE,
    )


def events_of(dsn: Dsn, key: str, *, verp: re.Pattern[str] | None, now: float) -> list[NewEvent]:
    """The bounce events of one DSN (``key`` names it when it has no Message-ID)."""
    original = dsn.original_message_id
    if original is None and verp is not None:
        for address in dsn.to:
            found = verp.fullmatch(address)
            if found:
                token = found["token"].replace("=", ".")
                original = f"<bulkmail.{token}@verp>"
                break
    out = []
    for r in dsn.recipients:
        klass = r.status[:1]
        if r.action == "failed" and klass == "5":
            kind = EventKind.BOUNCE
        elif r.action in ("failed", "delayed") and klass in ("4", "5"):
            kind = EventKind.SOFT_BOUNCE
        else:
            continue  # delivered, relayed, expanded: nothing went wrong
        detail = r.diagnostic or r.status
        if r.diagnostic and r.status and r.status not in r.diagnostic:
            detail = f"{r.status} {r.diagnostic}"
        out.append(
            NewEvent(
                event_id=f"dsn:{dsn.message_id or key}:{r.recipient.lower()}",
                kind=kind,
                email=r.recipient,
                at=dsn.date if dsn.date is not None else now,
                source="dsn",
                detail=detail,
                message_id=original,
            )
        )
    return out


@dataclass
class BounceRun:
    """What one `bulkmail bounces` run did."""

    messages: int = 0  # read this time (those processed before are not counted)
    not_dsn: int = 0  # of those, not a delivery status notification
    events: EventSummary | None = None

    def summary(self) -> EventSummary:
        if self.events is None:
            self.events = EventSummary()
        return self.events


def process(
    store: JobStore,
    messages: Iterator[tuple[Sequence[str], bytes]],
    *,
    verp: re.Pattern[str] | None = None,
    now: float | None = None,
) -> BounceRun:
    """Read each (keys, raw message) not processed yet, record its bounces and mark its
    keys processed, one transaction per message."""
    run = BounceRun()
    for keys, raw in messages:
        at = time.time() if now is None else now
        dsn = parse_dsn(raw)
        if dsn is not None and dsn.message_id:
            msgid_key = f"msgid:{dsn.message_id}"
            if store.processed_among([msgid_key]):
                continue
            keys = [*keys, msgid_key]
        run.messages += 1
        if dsn is None:
            run.not_dsn += 1
            store.record_events([], now=at, processed_keys=keys, note="not a DSN")
            continue
        found = events_of(dsn, keys[0], verp=verp, now=at)
        run.summary().add(store.record_events(found, now=at, processed_keys=keys, note="DSN"))
    run.summary()
    return run


def read_maildir(store: JobStore, folder: Path) -> Iterator[tuple[Sequence[str], bytes]]:
    """The Maildir's messages (``new/`` and ``cur/``) not processed yet, with their keys:
    the file name without its flags (a message moved from new/ to cur/ keeps it)."""
    if not (folder / "cur").is_dir() and not (folder / "new").is_dir():
        raise InputError(f"{folder}: not a Maildir (no cur/ or new/ folder)")
    for sub in ("new", "cur"):
        where = folder / sub
        if not where.is_dir():
            continue
        for path in sorted(where.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            key = "maildir:" + path.name.split(":2,")[0]
            if store.processed_among([key]):
                continue
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise InputError(f"{path}: cannot read ({exc.strerror})") from None
            yield [key], raw


@dataclass(frozen=True)
class ImapSource:
    """``--imap imaps://user@host[:port]/MAILBOX``."""

    host: str
    port: int
    user: str
    mailbox: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ImapSource:
        parts = urlsplit(url)
        if parts.scheme not in ("imaps", "imap") or not parts.hostname or not parts.username:
            raise InputError(f"--imap {url!r}: expected imaps://user@host/MAILBOX")
        tls = parts.scheme == "imaps"
        try:
            port = parts.port or (993 if tls else 143)
        except ValueError:
            raise InputError(f"--imap {url!r}: bad port") from None
        mailbox = unquote(parts.path.lstrip("/")) or "INBOX"
        return cls(parts.hostname, port, unquote(parts.username), mailbox, tls)


def read_imap(
    store: JobStore,
    source: ImapSource,
    *,
    password: str,
    ca_file: str = "",
    timeout: float = 30.0,
) -> Iterator[tuple[Sequence[str], bytes]]:
    """The mailbox's messages not processed yet (read-only: nothing is flagged or moved),
    keyed by Message-ID, else by mailbox, UIDVALIDITY and UID. TLS is verified (the
    system's trust store plus ``ca_file``); plain ``imap://`` only to loopback."""
    if not password:
        raise ConfigError(
            "the IMAP password is not set: set BULKMAIL_IMAP_PASSWORD "
            "(or password under [imap] in the config file)"
        )
    if not source.tls:
        problem = plaintext_problem(
            f"the IMAP password of {source.user}", source.host, "use imaps://"
        )
        if problem:
            raise ConfigError(problem)
    where = f"{source.host}:{source.port}"
    try:
        if source.tls:
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                source.host, source.port, ssl_context=client_context(ca_file), timeout=timeout
            )
        else:
            conn = imaplib.IMAP4(source.host, source.port, timeout=timeout)
    except OSError as exc:
        raise InputError(f"IMAP {where}: cannot connect ({exc})") from None
    try:
        try:
            conn.login(source.user, password)
        except imaplib.IMAP4.error as exc:
            raise ConfigError(f"IMAP {where}: login as {source.user} refused ({exc})") from None
        status, data = conn.select(_quoted(source.mailbox), readonly=True)
        if status != "OK":
            raise InputError(f"IMAP {where}: no mailbox {source.mailbox!r}")
        validity = _uidvalidity(conn)
        status, data = conn.uid("SEARCH", "ALL")
        uids = data[0].split() if status == "OK" and data and data[0] else []
        for uid in uids:
            uid_text = uid.decode()
            key = f"imap:{source.host}/{source.mailbox}/{validity}/{uid_text}"
            header = _fetch(conn, uid_text, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            msgid = BytesHeaderParser().parsebytes(header or b"").get("Message-ID")
            keys = [f"msgid:{str(msgid).strip()}"] if msgid else [key]
            if store.processed_among(keys):
                continue
            raw = _fetch(conn, uid_text, "(BODY.PEEK[])")
            if raw is not None:
                yield keys, raw
    except (imaplib.IMAP4.error, OSError) as exc:
        raise InputError(f"IMAP {where}: {exc}") from None
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()


def _quoted(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _uidvalidity(conn: imaplib.IMAP4) -> str:
    _, data = conn.response("UIDVALIDITY")
    value = data[0] if data and data[0] else b"0"
    return value.decode() if isinstance(value, bytes) else str(value)


def _fetch(conn: imaplib.IMAP4, uid: str, what: str) -> bytes | None:
    status, data = conn.uid("FETCH", uid, what)
    if status != "OK":
        return None
    for item in data:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
            return item[1]
    return None
