"""Plain data shared by sources, compose, providers and the manager."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bulkmail import mime

if TYPE_CHECKING:
    from email.message import EmailMessage


@dataclass(frozen=True)
class Recipient:
    """One row of the source after normalisation.

    ``row`` is the 1-based data row number in the source (the CSV header is row 1, so the
    first data row is row 2; a database result's first row is row 1). ``skip_reason`` is set
    when the row must not be sent (invalid address, duplicate, CR/LF in a value...): it still
    becomes a delivery, in state ``skipped``, so nothing is silently dropped.
    """

    row: int
    email: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str  # "maintype/subtype"
    data: bytes


@dataclass(frozen=True)
class Message:
    """A fully rendered message, independent of the transport that will carry it."""

    from_email: str
    from_name: str
    to_email: str
    to_name: str
    subject: str
    text: str
    message_id: str  # with angle brackets: "<...@...>"
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # extra headers, already checked for CR/LF
    # RFC 5322 Date ("Fri, 27 Nov 2026 19:24:35 +0000"), set when the message is built;
    # unlike the Message-ID it is not stable across resends
    date: str = ""
    # values the provider carries with the message and echoes in its events (Mailtrap's
    # custom_variables): the job and delivery ids, so an event finds its delivery
    variables: tuple[tuple[str, str], ...] = ()
    # (display name, address) pairs: Reply-To and Cc are headers; Bcc only goes into the
    # envelope (SMTP RCPT, Mailtrap's ``bcc``), never into the message
    reply_to: tuple[tuple[str, str], ...] = ()
    cc: tuple[tuple[str, str], ...] = ()
    bcc: tuple[tuple[str, str], ...] = ()

    @property
    def envelope_copies(self) -> tuple[str, ...]:
        """The addresses that get a copy of this message besides ``to_email`` (Cc, Bcc)."""
        return tuple(address for _, address in (*self.cc, *self.bcc))

    def to_email_message(self) -> EmailMessage:
        """The standards-correct MIME message (policy=SMTP: CRLF line ends)."""
        return mime.to_email_message(self)

    def to_bytes(self) -> bytes:
        """The reference serialisation (``mime.to_bytes_fast`` is what transports send)."""
        return mime.to_bytes(self)
