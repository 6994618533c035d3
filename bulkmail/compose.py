"""Rendering the subject, text and HTML templates for one recipient, and building its message.

``Templates.load`` reads and syntax-checks the template files once; a ``Composer`` compiles
them once and renders them per recipient with ``StrictUndefined`` (the HTML body autoescaped).
``Composer.check`` renders everything a send will render and raises ``InputError`` naming the
source, row, template and variable at fault, so a job is refused before anything is sent.

No header value built here may carry a line break: ``header_safe_problem`` (defined in
``bulkmail.headersafe``, shared with ``sources`` and re-exported here) says why a value is
unsafe (CR, LF, NUL, other controls, Unicode line separators, or an RFC 2047 encoded word that
decodes to one of those).

``to_bytes_fast`` serialises the common messages (text, or text + HTML, no attachments)
without going through ``EmailMessage``; see its docstring for the contract.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import os
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.policy import SMTPUTF8
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
from email_validator import EmailNotValidError, validate_email
from jinja2 import meta

from bulkmail.errors import InputError
from bulkmail.headersafe import header_safe_problem
from bulkmail.models import Attachment, Message, Recipient

__all__ = [
    "BUILTIN_VARIABLES",
    "MAX_ATTACHMENT_BYTES",
    "Composer",
    "Templates",
    "header_safe_problem",
    "message_id",
    "to_bytes_fast",
]

MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
"""Limit for one attachment file and for all attachments of one message together."""

BUILTIN_VARIABLES = frozenset({"name", "email", "row"})
"""Variables every recipient provides whatever the source's columns."""

DEFAULT_DOMAIN = "bulkmail.local"


# --------------------------------------------------------------------------- templates


def _environment(*, html: bool) -> jinja2.Environment:
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=html,
        keep_trailing_newline=True,
    )


def _read_template(path: str | Path) -> str:
    shown = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{shown}: is a directory, not a template file") from None
    except PermissionError:
        raise InputError(f"{shown}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{shown}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8"
        ) from None


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _parse(
    env: jinja2.Environment, source: str, label: str, *, lines: bool
) -> jinja2.nodes.Template:
    """The template's syntax tree; InputError naming ``label`` (and the line) when invalid."""
    try:
        return env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        message = _one_line(exc.message or "syntax error")
        where = f"{label}: line {exc.lineno}" if lines else label
        raise InputError(f"{where}: {message}") from None


_JINJA_DELIMITERS = ("{{", "{%", "{#")


def _absolute_pattern(pattern: str) -> str:
    """``pattern`` made absolute against the current directory, still a Jinja2 source."""
    if pattern.startswith("~"):
        pattern = os.path.expanduser(pattern)
    if os.path.isabs(pattern):
        return pattern
    base = os.path.join(os.getcwd(), "")
    if any(d in base for d in _JINJA_DELIMITERS):
        base = "{% raw %}" + base + "{% endraw %}"
    return base + pattern


def _fixed_dir(pattern: str) -> str | None:
    """The folder an absolute attachment pattern's literal beginning fixes (e.g.
    ``/srv/x/sheets`` for ``/srv/x/sheets/{{ course }}.pdf``), or None for a pattern without
    template syntax. A rendered path must stay inside it: a value such as ``../../.ssh/id_rsa``
    in a hostile CSV must not attach a file from elsewhere."""
    raw_open, raw_close = "{% raw %}", "{% endraw %}"
    literal, rest = "", pattern
    if pattern.startswith(raw_open) and raw_close in pattern:
        literal, _, rest = pattern[len(raw_open) :].partition(raw_close)
    cuts = [rest.find(d) for d in _JINJA_DELIMITERS if d in rest]
    if not cuts:
        return None
    literal += rest[: min(cuts)]
    return os.path.normpath(os.path.dirname(literal) or os.sep)


def _inside(path: str, folder: str) -> bool:
    normal = os.path.normpath(path)
    return normal == folder or normal.startswith(os.path.join(folder, ""))


def _shown_path(path: str) -> str:
    """A path as the user most likely typed it: relative when under the current directory."""
    base = os.path.join(os.getcwd(), "")
    raw_base = "{% raw %}" + base + "{% endraw %}"
    for prefix in (raw_base, base):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


@dataclass(frozen=True)
class Templates:
    """The template sources of one job: what the job store keeps to render again later."""

    subject: str  # Jinja2 source of the subject (given on the command line)
    text: str  # Jinja2 source of the text body
    html: str | None  # Jinja2 source of the HTML body (autoescaped)
    attachments: tuple[str, ...]  # path patterns (Jinja2 sources), absolute
    text_name: str  # file name for messages, e.g. "examples/reminder.txt"
    html_name: str | None

    @classmethod
    def load(
        cls,
        *,
        subject: str,
        text_path: str | Path,
        html_path: str | Path | None = None,
        attach: Sequence[str] = (),
    ) -> Templates:
        """Read the template files (UTF-8) and check the syntax of every template.

        Raises ``InputError`` naming the file (``--subject`` / ``--attach`` for those) and,
        for a syntax error in a file, the line.
        """
        env = _environment(html=False)
        _parse(env, subject, "--subject", lines=False)
        text = _read_template(text_path)
        _parse(env, text, str(text_path), lines=True)
        html: str | None = None
        if html_path is not None:
            html = _read_template(html_path)
            _parse(env, html, str(html_path), lines=True)
        patterns: list[str] = []
        for pattern in attach:
            if not pattern.strip():
                raise InputError("--attach: empty path")
            _parse(env, pattern, f"--attach {pattern!r}", lines=False)
            patterns.append(_absolute_pattern(pattern))
        return cls(
            subject=subject,
            text=text,
            html=html,
            attachments=tuple(patterns),
            text_name=str(text_path),
            html_name=None if html_path is None else str(html_path),
        )


# --------------------------------------------------------------------------- composer


def message_id(job_id: int, delivery_id: int, domain: str = DEFAULT_DOMAIN) -> str:
    """The stable Message-ID of one delivery: a resend after a crash carries the same one."""
    return f"<bulkmail.{job_id}.{delivery_id}@{domain}>"


_UNDEFINED = re.compile(r"'(?P<name>[^']+)' is undefined")
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


def _content_type(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


@dataclass(frozen=True)
class _Rendered:
    subject: str
    text: str
    html: str | None
    attachments: tuple[str, ...]  # absolute paths, checked


class Composer:
    """Renders one job's templates for each recipient; compiled once, reused for every row."""

    def __init__(
        self,
        templates: Templates,
        *,
        sender: str,
        job_id: int | None = None,
        domain: str | None = None,
    ) -> None:
        self.templates = templates
        self.job_id = job_id
        self.sender_name, self.sender_email = _parse_sender(sender)
        self.domain = domain or self.sender_email.rpartition("@")[2] or DEFAULT_DOMAIN
        text_env = _environment(html=False)
        html_env = _environment(html=True)
        self._globals = frozenset(text_env.globals)
        self._asts: list[jinja2.nodes.Template] = []
        self._subject = self._compile(text_env, templates.subject, "--subject", lines=False)
        self._text = self._compile(text_env, templates.text, templates.text_name, lines=True)
        self._html: jinja2.Template | None = None
        if templates.html is not None:
            html_name = templates.html_name or "HTML template"
            self._html = self._compile(html_env, templates.html, html_name, lines=True)
        self._attachments = tuple(
            (
                pattern,
                self._compile(text_env, pattern, "--attach", lines=False),
                _fixed_dir(pattern),
            )
            for pattern in templates.attachments
        )

    def _compile(
        self, env: jinja2.Environment, source: str, label: str, *, lines: bool
    ) -> jinja2.Template:
        self._asts.append(_parse(env, source, label, lines=lines))
        return env.from_string(source)

    @property
    def variables(self) -> set[str]:
        """Variables the templates use and do not define (Jinja2 globals such as ``range``
        excluded): each must be a column of the source or one of ``BUILTIN_VARIABLES``."""
        found: set[str] = set()
        for ast in self._asts:
            found |= meta.find_undeclared_variables(ast)
        return found - self._globals

    @property
    def header_variables(self) -> set[str]:
        """The variables the subject and the attachment paths use: their values reach a
        header (the subject, an attachment's file name), so a line break in one skips the
        row; the other columns only reach the body."""
        env = _environment(html=False)
        found: set[str] = set()
        for source in (self.templates.subject, *self.templates.attachments):
            found |= meta.find_undeclared_variables(env.parse(source))
        return found - self._globals

    def message_id(self, delivery_id: int) -> str:
        """The Message-ID of one of this composer's job's deliveries."""
        if self.job_id is None:
            raise ValueError("this composer has no job_id")
        return message_id(self.job_id, delivery_id, self.domain)

    def check(self, recipient: Recipient, origin: str) -> None:
        """Render everything ``build`` will for this recipient; raise ``InputError`` on the
        first problem. ``origin`` names the source (e.g. the CSV path). Skipped recipients are
        never rendered, so they are not checked."""
        if recipient.skip_reason is not None:
            return
        self._render(recipient, origin)

    def build(self, recipient: Recipient, message_id: str, *, origin: str | None = None) -> Message:
        """The message for this recipient, attachments read from disk."""
        if recipient.skip_reason is not None:
            raise ValueError(f"row {recipient.row} is skipped: {recipient.skip_reason}")
        rendered = self._render(recipient, origin)
        attachments: list[Attachment] = []
        for path in rendered.attachments:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                where = _where(origin, recipient)
                raise InputError(
                    f"{where}: attachment {_shown_path(path)!r} cannot be read "
                    f"({exc.strerror or exc})"
                ) from None
            attachments.append(Attachment(os.path.basename(path), _content_type(path), data))
        return Message(
            from_email=self.sender_email,
            from_name=self.sender_name,
            to_email=recipient.email,
            to_name=recipient.name,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            message_id=message_id,
            attachments=tuple(attachments),
            date=format_datetime(datetime.now(UTC)),
        )

    # -- rendering

    def _render(self, recipient: Recipient, origin: str | None) -> _Rendered:
        where = _where(origin, recipient)
        for what, value in (("name", recipient.name), ("email", recipient.email)):
            problem = header_safe_problem(value)
            if problem is not None:
                raise InputError(f"{where}: {what} {problem}")
        context: dict[str, Any] = dict(recipient.fields)
        context["name"] = recipient.name
        context["email"] = recipient.email
        context["row"] = recipient.row
        subject = _render(self._subject, context, where, "--subject")
        problem = header_safe_problem(subject)
        if problem is not None:
            raise InputError(f"{where}: subject {problem} after rendering")
        text = _render(self._text, context, where, f"template {self.templates.text_name}")
        html: str | None = None
        if self._html is not None:
            label = f"template {self.templates.html_name or 'HTML'}"
            html = _render(self._html, context, where, label)
        paths: list[str] = []
        total = 0
        for pattern, template, folder in self._attachments:
            label = f"--attach {_shown_path(pattern)!r}"
            path = _render(template, context, where, label)
            if folder is not None and not _inside(path, folder):
                shown_folder = _shown_path(os.path.join(folder, "")) or "./"
                raise InputError(
                    f"{where}: {label} renders {_shown_path(path)!r}, outside the folder "
                    f"{shown_folder!r}; a value may not lead out of it"
                )
            size = _check_attachment(path, where, label)
            total += size
            paths.append(path)
        if total > MAX_ATTACHMENT_BYTES:
            raise InputError(
                f"{where}: attachments total {_megabytes(total)}, over the "
                f"{_megabytes(MAX_ATTACHMENT_BYTES)} limit per message"
            )
        return _Rendered(subject, text, html, tuple(paths))


def _where(origin: str | None, recipient: Recipient) -> str:
    return f"{origin}: row {recipient.row}" if origin else f"row {recipient.row}"


def _render(template: jinja2.Template, context: dict[str, Any], where: str, label: str) -> str:
    try:
        return template.render(context)
    except jinja2.UndefinedError as exc:
        found = _UNDEFINED.fullmatch(exc.message or "")
        if found is not None:
            name = _one_line(found.group("name"))
            raise InputError(f"{where}: {label} uses undefined variable {name!r}") from None
        raise InputError(f"{where}: {label}: {_one_line(exc.message or str(exc))}") from None
    except jinja2.TemplateError as exc:
        raise InputError(f"{where}: {label}: {_one_line(exc.message or str(exc))}") from None
    except Exception as exc:  # a filter or expression failing on this row's values
        message = f"{type(exc).__name__}: {_one_line(str(exc))}"
        raise InputError(f"{where}: {label}: {message}") from None


def _check_attachment(path: str, where: str, label: str) -> int:
    """The size of the attachment file at ``path``; InputError when it cannot be attached."""
    if not os.path.basename(path).strip():
        raise InputError(f"{where}: {label} renders no file name ({_shown_path(path)!r})")
    shown = _shown_path(path)
    problem = header_safe_problem(os.path.basename(path))
    if problem is not None:
        raise InputError(f"{where}: attachment file name {shown!r} {problem}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{where}: attachment {shown!r} not found") from None
    except OSError as exc:
        raise InputError(
            f"{where}: attachment {shown!r} cannot be read ({exc.strerror or exc})"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{where}: attachment {shown!r} is not a regular file")
    if info.st_size > MAX_ATTACHMENT_BYTES:
        raise InputError(
            f"{where}: attachment {shown!r} is {_megabytes(info.st_size)}, over the "
            f"{_megabytes(MAX_ATTACHMENT_BYTES)} limit"
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"{where}: attachment {shown!r} cannot be read (permission denied)")
    return info.st_size


def _parse_sender(sender: str) -> tuple[str, str]:
    """(display name, ASCII address) of ``--from``; InputError when it is not a valid sender."""
    problem = header_safe_problem(sender)
    if problem is not None:
        raise InputError(f"--from: the sender {problem}")
    name, address = parseaddr(sender)
    # parseaddr is lenient (it drops spaces, takes the first of two addresses): the address
    # must appear as typed, and only once
    if not address or "@" not in address or sender.count("@") != 1 or address not in sender:
        raise InputError(
            f"--from: {sender!r} is not an email address "
            "(use 'office@example.edu' or 'Course Office <office@example.edu>')"
        )
    local, _, domain = address.rpartition("@")
    # email-validator refuses special-use names, but a sender on the local machine
    # (bulkmail@localhost, the outbox default) is fine: check only its local part then
    checked = f"{local}@example.com" if domain.lower() == "localhost" else address
    try:
        info = validate_email(checked, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InputError(f"--from: {address!r} is not a valid address: {exc}") from None
    if checked != address:
        return name.strip(), f"{info.local_part}@localhost"
    return name.strip(), info.ascii_email or info.normalized


# --------------------------------------------------------------------------- fast MIME path

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


def _encode_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body bytes) chosen as ``EmailMessage.set_content`` does
    under the SMTP policy: 7bit or 8bit when every line fits in 78 octets, else the shorter
    of quoted-printable and base64 for the first ten lines."""
    lines = text.encode("utf-8").splitlines()
    if max((len(line) for line in lines), default=0) <= _MAX_LINE:
        body = b"\r\n".join(lines) + b"\r\n"
        return ("7bit" if body.isascii() else "8bit"), body
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


def to_bytes_fast(message: Message) -> bytes:
    """``message.to_bytes()`` without building an ``EmailMessage``, for the common messages.

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
        return message.to_email_message().as_bytes(policy=SMTPUTF8)
    if message.attachments or message.headers:
        return message.to_bytes()
    head = _fast_headers(message)
    if head is None:
        return message.to_bytes()
    try:
        text_cte, text_body = _encode_body(message.text)
        if message.html is None:
            return b"".join(
                (head, _part_head("plain", text_cte), b"MIME-Version: 1.0\r\n\r\n", text_body)
            )
        html_cte, html_body = _encode_body(message.html)
    except UnicodeEncodeError:  # lone surrogates: let EmailMessage report them
        return message.to_bytes()
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


_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} (GMT|[+-]\d{4})")


def _fast_headers(message: Message) -> bytes | None:
    """From, To, Subject and Message-ID lines (CRLF-terminated), or None to fall back."""
    sender = _address_lines("From", message.from_name, message.from_email)
    if sender is None:
        return None
    to = _address_lines("To", message.to_name, message.to_email)
    if to is None:
        return None
    subject = _subject_lines(message.subject)
    if subject is None:
        return None
    mid = message.message_id
    if not _MSG_ID.fullmatch(mid) or len("Message-ID: ") + len(mid) > _MAX_LINE:
        return None
    lines = [*sender, *to, *subject, f"Message-ID: {mid}"]
    if message.date:
        if not _DATE.fullmatch(message.date):
            return None
        lines.append(f"Date: {message.date}")
    lines.append("")
    return "\r\n".join(lines).encode("ascii")
