"""A ``Message`` as MIME bytes, two ways that give the same message.

- The reference path, ``to_email_message`` / ``to_bytes``: the standard library's
  ``EmailMessage`` under the SMTP policy (CRLF line ends), for every message.
- The fast path, ``to_bytes_fast``: the common messages (text, or text + HTML, no
  attachments) written directly, several times faster, and everything else through the
  reference path; see its docstring for the contract. The transports send its output.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import sys
from email import quoprimime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkmail.models import Message

__all__ = ["to_bytes", "to_bytes_fast", "to_email_message"]


# --------------------------------------------------------------------------- reference path


def to_email_message(message: Message, *, seven_bit: bool = False) -> EmailMessage:
    """The standards-correct MIME message (policy=SMTP: CRLF line ends); with ``seven_bit``
    every text part is 7-bit (non-ASCII text quoted-printable or base64), for a server
    that does not offer 8BITMIME (RFC 6152)."""
    msg = EmailMessage(policy=_SMTP_7BIT if seven_bit else SMTP)
    msg["From"] = _address(message.from_name, message.from_email)
    msg["To"] = _address(message.to_name, message.to_email)
    if message.cc:
        msg["Cc"] = tuple(_address(name, address) for name, address in message.cc)
    if message.reply_to:
        msg["Reply-To"] = tuple(_address(name, address) for name, address in message.reply_to)
    msg["Subject"] = message.subject
    msg["Message-ID"] = message.message_id
    if message.date:
        msg["Date"] = message.date
    for key, value in message.headers:
        msg[key] = value
    msg.set_content(message.text)
    if message.html is not None:
        msg.add_alternative(message.html, subtype="html")
    for att in message.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(
            att.data,
            maintype=maintype,
            subtype=subtype or "octet-stream",
            filename=att.filename,
        )
    return msg


def to_bytes(message: Message, *, seven_bit: bool = False) -> bytes:
    return to_email_message(message, seven_bit=seven_bit).as_bytes()


_SMTP_7BIT = SMTP.clone(cte_type="7bit")


def _address(name: str, email: str) -> Address:
    local, _, domain = email.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)


# --------------------------------------------------------------------------- fast path

_MAX_LINE = 78  # EmailMessage's policy.max_line_length (SMTP policy)
_SPECIALS = frozenset('()<>@,:;."[]\\')
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_MSG_ID = re.compile(rf"<{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*>")
_Q_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!*+-/")
_Q_BYTE = {b: chr(b) if b in _Q_SAFE else f"={b:02X}" for b in range(256)}
_Q_BYTE[0x20] = "_"
_NLCRE = re.compile(r"\r\n|\r|\n")
_EW_OVERHEAD = len("=?utf-8?q??=")


def _q_encode(data: bytes) -> str:
    return "".join([_Q_BYTE[b] for b in data])


def _b_length(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def _use_q(data: bytes) -> bool:
    """EmailMessage's choice between Q and B for an encoded word: Q unless B is 5+ shorter."""
    return len(_q_encode(data)) - _b_length(len(data)) < 5


def _take_word(text: str, limit: int, use_q: bool) -> tuple[str, str]:
    """(encoded word, rest of text): the longest head of ``text`` whose encoded word is at most
    ``limit`` characters, cut between characters; the word is empty when not even one fits."""
    budget = limit - _EW_OVERHEAD
    size = 0
    nbytes = 0
    end = 0
    for ch in text:
        raw = ch.encode("utf-8")
        grown = size + len(_q_encode(raw)) if use_q else _b_length(nbytes + len(raw))
        if grown > budget:
            break
        size, nbytes, end = grown, nbytes + len(raw), end + 1
    if end == 0:
        return "", text
    data = text[:end].encode("utf-8")
    if use_q:
        return f"=?utf-8?q?{_q_encode(data)}?=", text[end:]
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?=", text[end:]


def _plain_value(value: str) -> bool:
    """True when ``value`` holds no character the fast path leaves to EmailMessage."""
    return value.isprintable() and "=?" not in value


def _address_lines(field: str, name: str, address: str) -> list[str] | None:
    """``From``/``To`` as EmailMessage writes it for ``Address(name, address)``, or None."""
    if not address.isascii():
        return None
    local, at, domain = address.rpartition("@")
    if not at or not _DOT_ATOM.fullmatch(local) or not _DOT_ATOM.fullmatch(domain):
        return None
    head = f"{field}: "
    if not name:
        lines = [head + address]
    else:
        # only names EmailMessage keeps as they are: no leading, trailing or double spaces
        if not _plain_value(name) or name != name.strip(" ") or "  " in name:
            return None
        if name.isascii():
            phrase = name
            if not _SPECIALS.isdisjoint(name):
                phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            # one encoded word: a phrase folded into several does not decode back exactly
            limit = min(75, _MAX_LINE - len(head))
            phrase, rest = _take_word(name, limit, _use_q(name.encode("utf-8")))
            if rest:
                return None
        lines = [f"{head}{phrase} <{address}>"]
        if len(lines[0]) > _MAX_LINE:
            lines = [head + phrase, f" <{address}>"]
    return lines if all(len(line) <= _MAX_LINE for line in lines) else None


_SPACES = re.compile(r"( +)")
_MIN_WORD = _EW_OVERHEAD + 12  # start an encoded word on a new line rather than a tiny one


def _subject_lines(subject: str) -> list[str] | None:
    """The Subject header folded into lines of at most 78 characters, ASCII words as they are
    and each run of non-ASCII words as encoded words (as EmailMessage does); None to fall back.

    Decoding keeps the whitespace next to a plain word and drops the whitespace between two
    encoded words, so a run of non-ASCII words (with the spaces inside it) is encoded as one
    text, cut into as many encoded words as needed, and a fold goes before a space only.
    """
    if not subject:
        return ["Subject:"]
    if not _plain_value(subject) or subject[0] == " ":
        return None
    parts = _SPACES.split(subject)  # words at even indexes, runs of spaces between them
    words, gaps = parts[0::2], ["", *parts[1::2]]
    lines = ["Subject:"]
    i = 0
    while i < len(words):
        gap = gaps[i] or " "  # the first word follows "Subject:" and its space
        if words[i].isascii():
            piece = gap + words[i]
            if len(lines[-1]) + len(piece) <= _MAX_LINE:
                lines[-1] += piece
            elif i > 0 and words[i] and len(piece) <= _MAX_LINE:
                lines.append(piece)  # fold before the gap
            else:
                return None
            i += 1
            continue
        end = i + 1
        while end < len(words) and not words[end].isascii():
            end += 1
        run = words[i] + "".join(gaps[k] + words[k] for k in range(i + 1, end))
        use_q = _use_q(run.encode("utf-8"))
        while run:
            room = min(75, _MAX_LINE - len(lines[-1]) - len(gap))
            if room < _MIN_WORD and lines[-1] != "Subject:":
                lines.append("")  # fold before the gap, or before the space between two words
                room = min(75, _MAX_LINE - len(gap))
            word, run = _take_word(run, room, use_q)
            if not word:
                return None
            lines[-1] += gap + word
            gap = " "  # between two encoded words: dropped when decoding
        i = end
    return lines


def _crlf(text: str) -> bytes:
    """What EmailMessage's generator writes for a payload: every line end made CRLF."""
    return "\r\n".join(_NLCRE.split(text)).encode("ascii", "surrogateescape")


def _encode_body(text: str, seven_bit: bool = False) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body bytes) chosen as ``EmailMessage.set_content`` does
    under the SMTP policy: 7bit or 8bit when every line fits in 78 octets, else the shorter
    of quoted-printable and base64 for the first ten lines. With ``seven_bit`` (the policy's
    ``cte_type="7bit"``) a non-ASCII text is never 8bit but quoted-printable or base64."""
    lines = text.encode("utf-8").splitlines()
    if max((len(line) for line in lines), default=0) <= _MAX_LINE:
        body = b"\r\n".join(lines) + b"\r\n"
        if body.isascii():
            return "7bit", body
        if not seven_bit:
            return "8bit", body
    embedded = b"\r\n".join(lines) + b"\r\n"
    sniff = b"\r\n".join(lines[:10]) + b"\r\n"
    sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), _MAX_LINE)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        per_line = _MAX_LINE // 4 * 3
        encoded = "".join(
            binascii.b2a_base64(embedded[i : i + per_line]).decode("ascii")
            for i in range(0, len(embedded), per_line)
        )
        return "base64", _crlf(encoded)
    if len(lines) <= 10:
        return "quoted-printable", _crlf(sniff_qp)
    normal = b"\n".join(lines) + b"\n"
    return "quoted-printable", _crlf(quoprimime.body_encode(normal.decode("latin-1"), _MAX_LINE))


def _part_head(subtype: str, cte: str) -> bytes:
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    ).encode("ascii")


def _boundary(*parts: bytes) -> str:
    """A boundary shaped like EmailMessage's, derived from the content (so the same message
    always gives the same bytes) and absent from it."""
    digest = hashlib.sha256(b"\0".join(parts)).digest()
    token = int.from_bytes(digest[:8], "big") % sys.maxsize
    boundary = "=" * 15 + f"{token:019d}" + "=="
    candidate, counter = boundary, 0
    while any(b"--" + candidate.encode("ascii") in part for part in parts):
        candidate = f"{boundary}.{counter}"
        counter += 1
    return candidate


def to_bytes_fast(message: Message, *, seven_bit: bool = False) -> bytes:
    """``message.to_bytes()`` without building an ``EmailMessage``, for the common messages.

    With ``seven_bit`` the same for ``to_bytes(message, seven_bit=True)``: only 7-bit
    bytes (a non-ASCII text part quoted-printable or base64), for an SMTP server that does
    not offer 8BITMIME. A message to or from a non-ASCII address is the exception below:
    it needs SMTPUTF8, which implies 8BITMIME (RFC 6531).

    Contract: the result parses back (``email.message_from_bytes`` with ``policy.default``)
    to the same headers (From, To, Subject, Message-ID, MIME-Version, each part's
    Content-Type apart from the multipart boundary, Content-Transfer-Encoding) and the same
    decoded bodies as ``message.to_bytes()``, with CRLF line ends only and no line over 78
    octets. One deliberate difference: where ``EmailMessage`` folds a long subject right
    before an encoded word it adds a space (CPython 3.11's folder); this path never alters a
    value, so there its Subject decodes to exactly ``message.subject``. In the common cases
    the bytes are identical to ``to_bytes()``'s, the boundary apart: this one is derived from
    the content, so the same message always gives the same bytes.

    The fast path covers a text body, or text + HTML, with no attachments or extra headers,
    ASCII or non-ASCII bodies, names and subjects. Anything else (attachments, control,
    separator or other non-printable characters, text that looks like an encoded word,
    names with leading, trailing or double spaces, names too long for one encoded word,
    quoted local parts, long Message-IDs...) goes through ``message.to_bytes()``, errors
    included. The one exception: a message to or from an address with a non-ASCII local part
    (it can only travel with SMTPUTF8) is ``EmailMessage`` output under the ``SMTPUTF8``
    policy, UTF-8 headers unencoded, rather than ``to_bytes()``'s, which is not valid there.
    """
    if not (message.from_email + message.to_email).isascii():
        # RFC 6531/6532: a non-ASCII local part is sent with SMTPUTF8 (the smtp provider asks
        # for it) and its headers are UTF-8 as they are; EmailMessage's SMTP policy would put
        # an encoded word inside the address, which no reader may decode there.
        return to_email_message(message).as_bytes(policy=SMTPUTF8)
    if message.attachments:
        return to_bytes(message, seven_bit=seven_bit)
    head = _fast_headers(message)
    if head is None:
        return to_bytes(message, seven_bit=seven_bit)
    try:
        text_cte, text_body = _encode_body(message.text, seven_bit)
        if message.html is None:
            return b"".join(
                (head, _part_head("plain", text_cte), b"MIME-Version: 1.0\r\n\r\n", text_body)
            )
        html_cte, html_body = _encode_body(message.html, seven_bit)
    except UnicodeEncodeError:  # lone surrogates: let EmailMessage report them
        return to_bytes(message, seven_bit=seven_bit)
    text_part = _part_head("plain", text_cte) + b"\r\n" + text_body
    html_part = _part_head("html", html_cte) + b"MIME-Version: 1.0\r\n\r\n" + html_body
    delimiter = b"--" + _boundary(text_part, html_part).encode("ascii")
    return b"".join(
        (
            head,
            b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="',
            delimiter[2:],
            b'"\r\n\r\n',
            delimiter,
            b"\r\n",
            text_part,
            b"\r\n",
            delimiter,
            b"\r\n",
            html_part,
            b"\r\n",
            delimiter,
            b"--\r\n",
        )
    )


_HEADER_NAME = re.compile(r"[!-9;-~]+")
# headers EmailMessage parses (addresses, dates, ids, MIME): left to it
_STRUCTURED = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-sender",
        "date",
        "resent-date",
        "orig-date",
        "message-id",
        "subject",
        "mime-version",
        "content-type",
        "content-disposition",
        "content-transfer-encoding",
    }
)
_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} (GMT|[+-]\d{4})")


def _fast_headers(message: Message) -> bytes | None:
    """From, To, Subject and Message-ID lines (CRLF-terminated), or None to fall back."""
    sender = _address_lines("From", message.from_name, message.from_email)
    if sender is None:
        return None
    to = _address_lines("To", message.to_name, message.to_email)
    if to is None:
        return None
    copies: list[str] = []
    for field, pairs in (("Cc", message.cc), ("Reply-To", message.reply_to)):
        if len(pairs) > 1:  # a list of addresses: EmailMessage folds it
            return None
        for name, address in pairs:
            lines = _address_lines(field, name, address)
            if lines is None:
                return None
            copies += lines
    subject = _subject_lines(message.subject)
    if subject is None:
        return None
    mid = message.message_id
    if not _MSG_ID.fullmatch(mid) or len("Message-ID: ") + len(mid) > _MAX_LINE:
        return None
    lines = [*sender, *to, *copies, *subject, f"Message-ID: {mid}"]
    if message.date:
        if not _DATE.fullmatch(message.date):
            return None
        lines.append(f"Date: {message.date}")
    for key, value in message.headers:
        # a short ASCII header as it is (EmailMessage writes it unchanged); anything that
        # would be folded, encoded or parsed as structured goes through EmailMessage
        line = f"{key}: {value}"
        if (
            not line.isascii()
            or not _plain_value(line)
            or len(line) > _MAX_LINE
            or key.lower() in _STRUCTURED
            or not _HEADER_NAME.fullmatch(key)
            or value != value.strip(" ")
            or "  " in value
            or not value
        ):
            return None
        lines.append(line)
    lines.append("")
    return "\r\n".join(lines).encode("ascii")
