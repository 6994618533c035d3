"""Plain data shared by sources, compose, providers and the manager."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any


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

    def to_email_message(self) -> EmailMessage:
        """Build the standards-correct MIME message (policy=SMTP: CRLF line ends)."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = _address(self.from_name, self.from_email)
        msg["To"] = _address(self.to_name, self.to_email)
        msg["Subject"] = self.subject
        msg["Message-ID"] = self.message_id
        if self.date:
            msg["Date"] = self.date
        for key, value in self.headers:
            msg[key] = value
        msg.set_content(self.text)
        if self.html is not None:
            msg.add_alternative(self.html, subtype="html")
        for att in self.attachments:
            maintype, _, subtype = att.content_type.partition("/")
            msg.add_attachment(
                att.data,
                maintype=maintype,
                subtype=subtype or "octet-stream",
                filename=att.filename,
            )
        return msg

    def to_bytes(self) -> bytes:
        return self.to_email_message().as_bytes()


def _address(name: str, email: str) -> Address:
    local, _, domain = email.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)


JSONDict = dict[str, Any]
