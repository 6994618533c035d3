"""Recipients from a CSV file or the course database, normalised, validated and de-duplicated.

``open_csv`` / ``open_db`` check eagerly what they can (the file or database, the header or
result columns, at least one data row) and return a ``Source``: iterating it gives one
``Recipient`` per data row, re-reading the file each time (a CSV) or from the rows of the one
run of the query (a database). Rows that must not be sent (bad or missing address, duplicate,
a value that is unsafe in a mail header: CR, LF, NUL, other controls, Unicode line separators,
an encoded word decoding to one of those; see ``bulkmail.headersafe``) are still yielded, with
``skip_reason`` set, so nothing is dropped silently and ``compose`` never meets a value it
would refuse. A CR or LF is fine in a column that only the body uses (multi-line notes) once
the caller says which columns reach a header (``Source.header_columns``). Every user error is
an ``InputError`` whose one-line message names the file or database, the row and the column at
fault.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import functools
import itertools
import json
import re
import sqlite3
import time
import zipfile
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from bulkmail.errors import InputError, file_error
from bulkmail.headersafe import header_safe_problem, plainly_safe
from bulkmail.models import Recipient

__all__ = [
    "DEFAULT_QUERY",
    "DELIMITERS",
    "EMAIL_ALIASES",
    "NAME_ALIASES",
    "QUERY_TIMEOUT",
    "Source",
    "check_encoding",
    "is_xlsx",
    "open_csv",
    "open_db",
    "open_xlsx",
    "query_addresses",
    "recheck_location",
    "select",
]

DEFAULT_QUERY = "SELECT name, email FROM instructors"

# Accepted column names, best first: when several are present the best one is the address
# (or name) column and the others stay ordinary template variables (e.g. a postal 'address').
EMAIL_ALIASES = (
    "email",
    "e-mail",
    "e_mail",
    "mail",
    "email address",
    "e-mail address",
    "address",
)
NAME_ALIASES = ("name", "full name", "fullname", "full_name", "instructor", "display name")


_Rows = Callable[[Iterable[str] | None], Iterator[Recipient]]


class Source:
    """Recipients from one CSV file or database query; iterate to get them (repeatably).

    ``header_columns``: the columns whose values can reach a mail header besides 'name' and
    'email' (which always do): those the subject and attachment paths use. A CR or LF in
    any other column (a body-only column such as multi-line notes) is kept; in these it
    skips the row. None, the default, counts every column as one.

    ``warnings``: one-line warnings for the user (e.g. a database role that can write).
    """

    def __init__(
        self,
        description: str,
        columns: Sequence[str],
        rows: _Rows,
        warnings: Sequence[str] = (),
    ) -> None:
        self.description = description  # for messages: the path, or the URL without password
        self.columns = list(columns)  # template variables: 'email', 'name'?, the other columns
        self.warnings = list(warnings)
        self.header_columns: frozenset[str] | None = None
        self._rows = rows

    def __iter__(self) -> Iterator[Recipient]:
        return self._rows(self.header_columns)

    def __repr__(self) -> str:
        return f"Source({self.description!r}, columns={self.columns!r})"


# --------------------------------------------------------------------------- shared logic


def _one_line(text: str) -> str:
    """Text safe to embed in a one-line message (control characters escaped)."""
    if not text.isprintable():
        return repr(text)[1:-1]
    return text


def _quote(text: str) -> str:
    """A column name or value quoted for a message, as the user would type it."""
    return "'" + _one_line(text).replace("'", "\\'") + "'"


def _alias_key(header: str) -> str:
    """Header text reduced for alias matching: case, spaces, '-' and '_' do not matter."""
    return re.sub(r"[\s_\-]+", "", header.casefold())


def _ranks(aliases: Sequence[str]) -> dict[str, int]:
    """Alias key -> rank (0 is best)."""
    ranks: dict[str, int] = {}
    for rank, alias in enumerate(aliases):
        ranks.setdefault(_alias_key(alias), rank)
    return ranks


_EMAIL_RANK = _ranks(EMAIL_ALIASES)
_NAME_RANK = _ranks(NAME_ALIASES)


@dataclass(frozen=True)
class _Layout:
    """Which input column becomes which template variable."""

    labels: list[str]  # the column names as written in the source (for messages)
    keys: list[str]  # the template variable names ('email', 'name' or the label)
    positions: list[int]  # index of each kept column in a raw row
    width: int  # number of columns in the header / result


def _layout(origin: str, labels: Sequence[str], what: str, hint: str = "") -> _Layout:
    """Match the email and name columns by alias; reject duplicate or missing columns."""
    kept = [(pos, label) for pos, label in enumerate(labels) if label]
    seen: dict[str, str] = {}
    for _, label in kept:
        folded = label.casefold()
        if folded in seen:
            raise InputError(
                f"{origin}: column {_quote(label)} appears twice in the {what} (rename one of them)"
            )
        seen[folded] = label

    def best(ranks: dict[str, int], role: str, taken: int | None) -> int | None:
        candidates = [
            (ranks[_alias_key(label)], pos)
            for pos, label in kept
            if _alias_key(label) in ranks and pos != taken
        ]
        if not candidates:
            return None
        candidates.sort()
        if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
            first, second = labels[candidates[0][1]], labels[candidates[1][1]]
            raise InputError(
                f"{origin}: columns {_quote(first)} and {_quote(second)} both look like the"
                f" {role} column; rename one of them"
            )
        return candidates[0][1]

    email_pos = best(_EMAIL_RANK, "email", None)
    if email_pos is None:
        found = ", ".join(_one_line(label) for _, label in kept) or "no named columns"
        if what == "header" and any("@" in label for _, label in kept):
            hint = " (the first row looks like data: add a header row such as name,email)"
        raise InputError(
            f"{origin}: no 'email' column (found: {found}); accepted names: "
            f"{', '.join(EMAIL_ALIASES)}{hint}"
        )
    name_pos = best(_NAME_RANK, "name", email_pos)
    keys = []
    for pos, label in kept:
        keys.append("email" if pos == email_pos else "name" if pos == name_pos else label)
    return _Layout(
        labels=[label for _, label in kept],
        keys=keys,
        positions=[pos for pos, _ in kept],
        width=len(labels),
    )


def _deliverable(address: str) -> str:
    """The address as it is sent: normalised by email-validator, an internationalised domain
    in its ASCII form (``bücher.example`` -> ``xn--bcher-kva.example``) so that the To header
    stays plain ASCII; only a non-ASCII local part still needs SMTPUTF8.

    The common address (a plain ASCII dot-atom before the @) takes a short cut with the same
    result: its local part is checked here and its domain, shared by many rows, is checked
    by email-validator once. Anything else, and any doubt, goes through email-validator.
    """
    match = _PLAIN_ADDRESS.fullmatch(address)
    if match is not None and len(match["local"]) <= 64:
        domain = _plain_domain(match["domain"])
        if domain is not None:
            candidate = f"{match['local']}@{domain}"
            if len(candidate) <= 254:
                return candidate
    info = validate_email(address, check_deliverability=False)
    return info.ascii_email or info.normalized


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>[A-Za-z0-9.-]+)")


@functools.lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> str | None:
    """The normalised form of an ASCII domain as email-validator gives it, or None when it
    refuses it (the caller then lets email-validator word the error)."""
    try:
        info = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    return info.ascii_domain


_LINE_END = re.compile(r"\r\n|\r|\n")


def _body_safe_problem(value: str) -> str | None:
    """As ``header_safe_problem``, but a CR or LF is a legitimate line end in a body."""
    if "\r" in value or "\n" in value:
        value = _LINE_END.sub(" ", value)
    return header_safe_problem(value)


class _Builder:
    """Turns raw rows into Recipients, remembering addresses already seen."""

    def __init__(self, layout: _Layout, header_columns: Iterable[str] | None = None) -> None:
        self.layout = layout
        self.seen: dict[str, int] = {}
        # per kept column: the check its values need
        if header_columns is None:
            self.checks = [header_safe_problem] * len(layout.keys)
        else:
            header = {"name", "email", *header_columns}
            self.checks = [
                header_safe_problem if key in header else _body_safe_problem for key in layout.keys
            ]
        # every column of the row is kept, in order (no unnamed column)
        self.every_column = layout.positions == list(range(layout.width))

    def _problem(self, raw: Sequence[str]) -> str | None:
        """The first unsafe value of the row, checked column by column as it needs."""
        layout = self.layout
        for label, pos, check in zip(layout.labels, layout.positions, self.checks, strict=True):
            problem = check(raw[pos])
            if problem is not None:
                return f"column {_quote(label)} {problem}"
        return None

    def build(self, row: int, raw: Sequence[str]) -> Recipient:
        layout = self.layout
        if len(raw) < layout.width:  # missing trailing fields are empty
            raw = [*raw, *[""] * (layout.width - len(raw))]
        # the common row: every value plainly safe, checked at once (extra fields and
        # unnamed columns included: anything unusual anywhere takes the full check)
        reason = None if plainly_safe(" ".join(raw)) else self._problem(raw)
        if self.every_column:
            # values beyond the last column are ignored (zip stops there)
            fields = dict(zip(layout.keys, map(str.strip, raw), strict=False))
        else:
            kept = zip(layout.keys, layout.positions, strict=True)
            fields = {key: raw[pos].strip() for key, pos in kept}
        email = fields["email"]
        if reason is None:
            if not email:
                reason = "no email address"
            else:
                try:
                    email = _deliverable(email)
                except EmailNotValidError as exc:
                    reason = f"invalid address: {_one_line(str(exc))}"
                else:
                    key = email.casefold()
                    first = self.seen.get(key)
                    if first is not None:
                        reason = f"duplicate of row {first}"
                    else:
                        self.seen[key] = row
        fields["email"] = email
        return Recipient(
            row=row, email=email, name=fields.get("name", ""), fields=fields, skip_reason=reason
        )


# --------------------------------------------------------------------------- CSV


class _NotDecodable(Exception):
    """Raised by _Lines so the reader can name the row being read."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


_BARE_CR = re.compile(rb"(?<=\r)(?!\n)")
_TEXT_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class _Lines:
    """The file's physical lines, decoded (a UTF-8 BOM is dropped); iterate once.

    Lines end with LF, CRLF or a bare CR (old Mac exports), as in an editor; the csv module
    joins the lines of a quoted multi-line value itself. UTF-8 is decoded some 64 KiB of
    whole lines at a time (a chunk that does not decode is decoded line by line, to name
    the line at fault); other encodings in which CR and LF are single ASCII bytes a line
    at a time; one in which they are not (UTF-16, UTF-32: Excel's "Unicode text") whole
    first. A line that does not decode raises ``_NotDecodable`` with its number when it is
    reached, after every line before it.
    """

    def __init__(self, stream: IO[bytes], encoding: str = "utf-8") -> None:
        self._stream = stream
        self._encoding = encoding
        self._utf8 = codecs.lookup(encoding).name == "utf-8"

    def __iter__(self) -> Iterator[str]:
        if not _ascii_lines(self._encoding):
            return self._decode_whole()
        if self._utf8:
            return self._utf8_chunks()
        return self._one_by_one()

    def _decode_whole(self) -> Iterator[str]:
        data = self._stream.read()
        try:
            text = data.decode(self._encoding)
        except UnicodeDecodeError as exc:
            before = data[: exc.start].decode(self._encoding, "replace")
            raise _NotDecodable(len(_LINE_END.findall(before)) + 1) from None
        yield from _TEXT_LINE.findall(text.removeprefix("\ufeff"))

    def _utf8_chunks(self) -> Iterator[str]:
        # a chunk ends with a LF (or the file): never between the CR and LF of a CRLF,
        # nor inside a character; UTF-8 has no CR or LF byte inside a character, so the
        # chunk's lines are the lines of its text
        count = 0
        while True:
            chunk = self._stream.readlines(_CHUNK)
            if not chunk:
                return
            data = b"".join(chunk)
            try:
                text = data.decode("utf-8-sig" if count == 0 else "utf-8")
            except UnicodeDecodeError:
                for piece in data.splitlines(keepends=True):  # at LF, CRLF and bare CR
                    count += 1
                    yield self._decode(piece, count)
                continue
            lines = _TEXT_LINE.findall(text) or [text]  # a file of a BOM alone: one empty line
            count += len(lines)
            yield from lines

    def _one_by_one(self) -> Iterator[str]:
        count = 0
        while True:
            data = self._stream.readline()
            if not data:
                return
            if b"\r" not in data or (data.endswith(b"\r\n") and b"\r" not in data[:-2]):
                pieces = [data]  # one line: no bare CR in it
            else:
                pieces = [piece for piece in _BARE_CR.split(data) if piece]
            for piece in pieces:
                count += 1
                yield self._decode(piece, count)

    def _decode(self, data: bytes, line: int) -> str:
        encoding = "utf-8-sig" if self._utf8 and line == 1 else self._encoding
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            raise _NotDecodable(line) from None


_CHUNK = 1 << 16  # bytes of whole lines decoded at once


@functools.lru_cache(maxsize=32)
def _ascii_lines(encoding: str) -> bool:
    """Whether CR, LF, the delimiters and the quote are their ASCII bytes in ``encoding``
    (UTF-8, cp1252, latin-1...), so that the file can be split into lines undecoded."""
    sample = '\r\n,;\t|"ab'
    try:
        return sample.encode(encoding) == sample.encode("ascii")
    except UnicodeError:
        return False


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it as a text encoding, else InputError naming --encoding."""
    try:
        "a".encode(encoding)
        b"a".decode(encoding)
    except LookupError:
        raise InputError(
            f"--encoding: unknown encoding {_quote(encoding)} (e.g. utf-8, cp1252, latin-1, utf-16)"
        ) from None
    except UnicodeError:
        pass  # a real text encoding that cannot encode 'a' on its own (rare): let it be
    return encoding


def _open_binary(path: Path, origin: str) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise file_error(origin, exc, "a CSV file") from None


DELIMITERS = (",", ";", "\t", "|")
"""The delimiters a CSV may use, preferred in this order when the header has as many of each."""


def _sniff_delimiter(line: str) -> str:
    """The delimiter the header line uses most outside quotes (',' when it has none).

    In place of ``csv.Sniffer``: on one header line it prefers ',' to a more frequent ';'
    and its quote guessing misreads a quoted header; counting is predictable and needs no
    second line.
    """
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(DELIMITERS, key=lambda d: counts[d])  # max keeps the first of equals
    return best if counts[best] else ","


def _is_blank(record: Sequence[str]) -> bool:
    """Whether every value is empty or white space (so is their concatenation)."""
    return not "".join(record).strip()


def _not_decodable(origin: str, where: str, encoding: str | None) -> InputError:
    if encoding is None:
        return InputError(
            f"{origin}: {where}: not valid UTF-8 (save the file as UTF-8, or name its"
            " encoding: --encoding cp1252 is what Excel on Windows writes)"
        )
    return InputError(f"{origin}: {where}: not valid {_one_line(encoding)} (check --encoding)")


def _records(
    path: Path, origin: str, encoding: str | None = None
) -> Generator[tuple[int, list[str]], None, None]:
    """(line where the record starts, fields) for every non-blank record, header included."""
    with _open_binary(path, origin) as stream:
        lines = _Lines(stream, encoding or "utf-8")
        delimiter = ","
        try:
            for line in lines:
                if line.strip():
                    delimiter = _sniff_delimiter(line)
                    break
        except _NotDecodable as exc:
            raise _not_decodable(origin, f"row {exc.line}", encoding) from None
        stream.seek(0)
        lines = _Lines(stream, encoding or "utf-8")
        reader = csv.reader(lines, delimiter=delimiter, skipinitialspace=True, strict=True)
        while True:
            start = reader.line_num + 1  # the physical lines read so far, plus one
            try:
                record = next(reader)
            except StopIteration:
                return
            except _NotDecodable as exc:
                where = f"row {start}" + (f" (line {exc.line})" if exc.line != start else "")
                raise _not_decodable(origin, where, encoding) from None
            except csv.Error as exc:
                problem = _one_line(str(exc))
                if problem == "unexpected end of data":
                    problem = 'a quoted value starting here is never closed (a stray ")'
                raise InputError(f"{origin}: row {start}: malformed CSV: {problem}") from None
            if not _is_blank(record):
                yield start, record


def _csv_header(path: Path, origin: str, encoding: str | None) -> tuple[_Layout, bool]:
    """The layout from the header row, and whether at least one data row follows."""
    records = _records(path, origin, encoding)
    try:
        first = next(records, None)
        if first is None:
            raise InputError(f"{origin}: empty file, expected a header row")
        layout = _layout(origin, [label.strip() for label in first[1]], "header")
        return layout, next(records, None) is not None
    finally:
        records.close()


def _csv_rows(
    path: Path, origin: str, encoding: str | None, header_columns: Iterable[str] | None
) -> Iterator[Recipient]:
    records = _records(path, origin, encoding)
    try:
        header = next(records, None)
        if header is None:
            return
        layout = _layout(origin, [label.strip() for label in header[1]], "header")
        builder = _Builder(layout, header_columns)
        for row, record in records:
            if len(record) > layout.width and not _is_blank(record[layout.width :]):
                raise InputError(
                    f"{origin}: row {row}: {len(record)} fields but the header has"
                    f" {layout.width} columns (quote values that contain the delimiter)"
                )
            yield builder.build(row, record)
    finally:
        records.close()


def open_csv(path: str | Path, *, encoding: str | None = None) -> Source:
    """Open a CSV of recipients: a header row with an email column, delimited by ',', ';',
    tab or '|' (whichever the header uses most), UTF-8 (a BOM is fine) unless ``encoding``
    names another (``--encoding``).

    An Excel workbook (.xlsx, recognised by its content whatever its name) is read as
    ``open_xlsx`` reads it, from its first sheet: a user who exported nothing should not
    have to. Raises InputError now for an unreadable or empty file, a bad header or no data
    row; iterating may raise it for a row that cannot be decoded or has too many fields.
    """
    file = Path(path)
    origin = _one_line(str(path))
    if encoding is not None:
        check_encoding(encoding)
    kind = _file_kind(file, origin)
    if kind == "xlsx":
        if encoding is not None:
            raise InputError(f"{origin}: an Excel file needs no --encoding")
        return open_xlsx(file)
    if kind is not None:
        raise InputError(f"{origin}: {kind}, not a CSV file; {_SAVE_AS}")
    layout, has_rows = _csv_header(file, origin, encoding)
    if not has_rows:
        raise InputError(f"{origin}: no data rows below the header")
    return Source(origin, layout.keys, lambda header: _csv_rows(file, origin, encoding, header))


# --------------------------------------------------------------------------- Excel

_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # .xls and other old Office files
_SAVE_AS = "save it as an Excel workbook (.xlsx) or as CSV UTF-8"


def _file_kind(path: Path, origin: str) -> str | None:
    """'xlsx' for an Excel workbook, a description for another binary office file, None
    for anything else (text, presumably)."""
    with _open_binary(path, origin) as stream:
        magic = stream.read(8)
    if magic.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a damaged ZIP archive"
        if "xl/workbook.xml" in names:
            return "xlsx"
        if "mimetype" in names or "content.xml" in names:
            return "an OpenDocument file"
        return "a ZIP archive"
    if magic == _OLE_MAGIC:
        return "an old-style Office file (.xls?)"
    return None


def is_xlsx(path: str | Path) -> bool:
    """Whether ``path`` holds an Excel workbook (by content, not by name); False when it
    cannot be read (opening it then says why)."""
    try:
        return _file_kind(Path(path), str(path)) == "xlsx"
    except InputError:
        return False


def _cell_text(value: object) -> str:
    """A cell as the text a template gets: dates as ISO dates (a time only when it has one),
    whole numbers without '.0', other numbers as Excel shows them (15 digits)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, datetime.datetime):
        if value.time() == datetime.time(0):
            return value.date().isoformat()
        return value.isoformat(sep=" ", timespec="minutes" if not value.second else "seconds")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, datetime.time):
        return value.isoformat(timespec="minutes" if not value.second else "seconds")
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return format(value, ".15g")
    return str(value)


def _read_sheet(
    stream: IO[bytes], origin: str, sheet: str | None
) -> tuple[list[str], str, list[tuple[int, list[str]]]]:
    """(the workbook's sheet names, the sheet read, its non-blank rows with their numbers)."""
    import openpyxl  # a second or so to import: only when a workbook is read

    try:
        book = openpyxl.load_workbook(stream, read_only=True, data_only=True)
    except Exception as exc:  # a damaged workbook fails in many ways, all the same to us
        raise InputError(f"{origin}: cannot read the workbook ({_problem(exc)})") from None
    try:
        names = [ws.title for ws in book.worksheets]
        if not names:
            raise InputError(f"{origin}: the workbook has no worksheet")
        if sheet is None:
            sheet = names[0]
        elif sheet not in names:
            raise InputError(
                f"--sheet: {origin} has no sheet {_quote(sheet)}"
                f" (sheets: {', '.join(_quote(n) for n in names)})"
            )
        ws = book[sheet]
        ws.reset_dimensions()  # some writers record a wrong used range: read every row
        records: list[tuple[int, list[str]]] = []
        try:
            for number, values in enumerate(ws.iter_rows(values_only=True), 1):
                record = [_cell_text(v) for v in values]
                if not _is_blank(record):
                    records.append((number, record))
        except Exception as exc:
            raise InputError(
                f"{origin}: cannot read the sheet {_quote(sheet)} ({_problem(exc)})"
            ) from None
        return names, sheet, records
    finally:
        book.close()


def _problem(exc: Exception) -> str:
    text = str(exc).strip()
    return _one_line(text.splitlines()[0]) if text else type(exc).__name__


def open_xlsx(path: str | Path, sheet: str | None = None) -> Source:
    """Open the recipients in an Excel workbook's sheet (``sheet``, else the first one):
    a header row with an email column, then a row per recipient, numbered as the sheet
    numbers them. Values are what Excel last computed (formulas are not evaluated), as
    text: dates as ISO dates (YYYY-MM-DD), 12.0 as "12". Empty rows are ignored, and so is
    anything in a column without a header. The sheet is read once, here.
    """
    file = Path(path)
    origin = _one_line(str(path))
    kind = _file_kind(file, origin)
    if kind != "xlsx":
        what = kind or "a text file (a CSV? use --csv PATH)"
        raise InputError(f"{origin}: not an Excel workbook (.xlsx) but {what}")
    # openpyxl goes by the file name's extension: give it the open file, whatever its name
    with _open_binary(file, origin) as stream:
        names, sheet, records = _read_sheet(stream, origin, sheet)
    origin = f"{origin} (sheet {_quote(sheet)})" if len(names) > 1 else origin
    if not records:
        raise InputError(f"{origin}: empty sheet, expected a header row")
    layout = _layout(origin, [label.strip() for label in records[0][1]], "header")
    if len(records) == 1:
        raise InputError(f"{origin}: no data rows below the header")
    data = records[1:]

    def recipients(header_columns: Iterable[str] | None) -> Iterator[Recipient]:
        builder = _Builder(layout, header_columns)
        for row, values in data:
            yield builder.build(row, values)

    return Source(origin, layout.keys, recipients)


# --------------------------------------------------------------------------- database

QUERY_TIMEOUT = 30.0
"""Seconds a ``--query`` may run (PostgreSQL ``statement_timeout``, a SQLite progress
handler) before the database stops it."""

_WORD = re.compile(r"[(\s]*([A-Za-z_]+)")
# PostgreSQL: $$ or $tag$ opens a dollar-quoted string, closed by the same tag; not after a
# character that continues an identifier ('a$b$' is a name) and not $1 (a parameter)
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_IDENTIFIER_CHAR = re.compile(r"[\w$]")


@dataclass(frozen=True)
class _Dialect:
    """The lexical rules that dialects disagree on."""

    backslash: bool  # backslash escapes in strings (MySQL, PostgreSQL E'...')
    hash_comments: bool  # '#' starts a comment (MySQL)
    brackets: bool  # [bracketed] names (SQL Server, SQLite)
    dollar: bool  # $tag$ ... $tag$ strings (PostgreSQL)
    nested: bool  # /* /* */ */ comments nest (PostgreSQL)


_DIALECTS = [
    _Dialect(*flags) for flags in itertools.product((False, True), repeat=len(fields(_Dialect)))
]


def _skip_string(sql: str, i: int, dialect: _Dialect) -> int:
    """The index after the quoted string or name that starts at ``sql[i]``."""
    ch, n = sql[i], len(sql)
    close = "]" if ch == "[" else ch
    j = i + 1
    while j < n:
        if dialect.backslash and sql[j] == "\\" and ch != "[":
            j += 2
            continue
        if sql[j] == close:
            if close != "]" and sql.startswith(close * 2, j):
                j += 2
                continue
            break
        j += 1
    return j + 1


def _skip_comment(sql: str, i: int, dialect: _Dialect) -> int:
    """The index after the block comment that starts at ``sql[i]`` ('/*')."""
    depth, j, n = 1, i + 2, len(sql)
    while j < n:
        if sql.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        elif dialect.nested and sql.startswith("/*", j):
            depth += 1
            j += 2
        else:
            j += 1
    return n


def _split_sql(sql: str, dialect: _Dialect) -> list[str]:
    """The statements in ``sql`` (comments removed, empty ones dropped), for one SQL dialect.

    Dialects disagree on backslash escapes, '#' comments, [bracketed] names, dollar-quoted
    strings and nested comments, so the caller checks every combination: a query is
    accepted only if all of them see one statement.
    """
    statements: list[str] = []
    code: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        dollar = None
        if dialect.dollar and ch == "$" and not (i and _IDENTIFIER_CHAR.match(sql[i - 1])):
            dollar = _DOLLAR_TAG.match(sql, i)
        if dollar is not None:
            end = sql.find(dollar.group(), dollar.end())
            j = n if end < 0 else end + len(dollar.group())
            code.append(sql[i:j])
            i = j
        elif ch in "'\"`" or (dialect.brackets and ch == "["):
            j = _skip_string(sql, i, dialect)
            code.append(sql[i:j])
            i = j
        elif sql.startswith("--", i) or (dialect.hash_comments and ch == "#"):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            code.append(" ")
        elif sql.startswith("/*", i):
            i = _skip_comment(sql, i, dialect)
            code.append(" ")
        elif ch == ";":
            statements.append("".join(code))
            code = []
            i += 1
        else:
            code.append(ch)
            i += 1
    statements.append("".join(code))
    return [s.strip() for s in statements if s.strip()]


def _check_query(query: str) -> str:
    """The query without a trailing ';' if it is one SELECT or WITH statement, else raise.

    A check before the query reaches the database, in defence in depth: the database is
    also asked to run one statement only, in a read-only transaction that is rolled back.
    """
    for dialect in _DIALECTS:
        statements = _split_sql(query, dialect)
        if not statements:
            raise InputError("--query: empty query")
        if len(statements) > 1:
            raise InputError(
                "--query: only a single SELECT or WITH statement is accepted"
                " (found more than one statement)"
            )
        match = _WORD.match(statements[0])
        word = match.group(1).upper() if match else ""
        if word not in ("SELECT", "WITH"):
            shown = f" (found {_one_line(word)})" if word else ""
            raise InputError("--query: only a single SELECT or WITH statement is accepted" + shown)
    cleaned = query.strip()
    while cleaned.endswith(";"):
        cleaned = cleaned[:-1].rstrip()
    return cleaned


def _first_line(exc: BaseException) -> str:
    """The database's own message, first line only (without SQLAlchemy's decorations)."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(inner).strip() or type(inner).__name__
    return _one_line(text.splitlines()[0])


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # Do not echo the text: it may hold a password.
        raise InputError(
            "--db: not a valid database URL (expected e.g. sqlite:///course.db or"
            " postgresql://user@host/dbname)"
        ) from None


def _engine(parsed: URL, origin: str) -> Engine:
    """An engine for ``parsed``; SQLite files are opened read-only and must exist.

    PostgreSQL is reached through psycopg 3 only: it can send the query so that the server
    refuses a second statement (psycopg2 cannot), so a plain ``postgresql://`` means
    ``postgresql+psycopg://`` and another PostgreSQL driver is refused.
    """
    kwargs: dict[str, Any] = {"poolclass": NullPool}
    database = parsed.database or ""
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.get_driver_name() != "psycopg":
            raise InputError(
                f"{origin}: the {_one_line(parsed.get_driver_name())} driver cannot keep a"
                " --query to one statement; use postgresql+psycopg:// (psycopg 3)"
            )
    elif parsed.get_backend_name() == "sqlite" and database.startswith("file:"):
        # sqlite:///file:path?uri=true: SQLite's own URI form; force read-only there too.
        parsed = parsed.update_query_dict({"mode": "ro"})
    elif (
        parsed.get_backend_name() == "sqlite"
        and parsed.get_driver_name() == "pysqlite"
        and database not in ("", ":memory:")
    ):
        file = Path(database)
        if not file.exists():
            raise InputError(f"{origin}: no such database file {_quote(database)}")
        if file.is_dir():
            raise InputError(f"{origin}: {_quote(database)} is a directory, not a database")
        uri = f"{file.resolve().as_uri()}?mode=ro"
        kwargs["creator"] = lambda: sqlite3.connect(uri, uri=True)
    try:
        return create_engine(parsed, **kwargs)
    except (ImportError, NoSuchModuleError, ArgumentError) as exc:
        raise InputError(f"{origin}: cannot use this database ({_first_line(exc)})") from None


@contextmanager
def _read_only(parsed: URL, origin: str, timeout: float) -> Iterator[Connection]:
    """A connection in a read-only transaction that is always rolled back, then disposed;
    a statement that runs longer than ``timeout`` seconds is stopped by the database."""
    engine = _engine(parsed, origin)
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise InputError(f"{origin}: cannot connect ({_first_line(exc)})") from None
        with conn:
            try:
                backend = parsed.get_backend_name()
                try:
                    if backend == "sqlite":
                        conn.exec_driver_sql("PRAGMA query_only = ON")
                        _sqlite_deadline(conn, timeout)
                    elif backend == "postgresql":
                        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                        milliseconds = max(1, round(timeout * 1000))
                        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")
                except SQLAlchemyError as exc:
                    raise InputError(
                        f"{origin}: cannot start a read-only transaction ({_first_line(exc)})"
                    ) from None
                yield conn
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def _sqlite_deadline(conn: Connection, timeout: float) -> None:
    """Make SQLite interrupt any statement on this connection after ``timeout`` seconds."""
    raw = conn.connection.dbapi_connection
    if raw is None or not hasattr(raw, "set_progress_handler"):
        return
    deadline = time.monotonic() + timeout

    def past_deadline() -> bool:
        return time.monotonic() > deadline

    raw.set_progress_handler(past_deadline, 1000)


@dataclass(frozen=True)
class _Result:
    """One run of the query: its column labels and every row as text."""

    labels: list[str]
    rows: list[list[str]]


def _run(conn: Connection, query: str, origin: str, timeout: float) -> _Result:
    """Run ``query`` once on the driver's own cursor, as one statement only, and fetch every
    row. psycopg sends it with the extended protocol (a prepared statement), which the
    server refuses for more than one statement; sqlite3's ``execute`` refuses a second
    statement itself. The SQL goes to the driver verbatim: '%' and ':x' included."""
    dbapi_error: type[Exception] = conn.dialect.loaded_dbapi.Error
    raw = conn.connection.dbapi_connection
    psycopg = conn.dialect.driver == "psycopg"
    if psycopg and getattr(raw, "prepare_threshold", 0) is None:
        raw.prepare_threshold = 5  # type: ignore[union-attr]  # None would disable prepare=True

    def failed(exc: Exception, where: str = "") -> InputError:
        text = _first_line(exc)
        if "interrupted" in text.lower() or "statement timeout" in text.lower():
            text = f"stopped after {timeout:g} s ({text})"
        return InputError(f"{origin}: {where}query failed: {text}")

    cursor = conn.connection.cursor()
    try:
        try:
            if psycopg:
                cursor.execute(query, prepare=True)  # type: ignore[call-arg]
            else:
                cursor.execute(query)
        except dbapi_error as exc:
            raise failed(exc) from None
        if cursor.description is None:
            raise InputError(f"{origin}: the query returned no result")
        labels = [str(column[0]) for column in cursor.description]
        rows: list[list[str]] = []
        while True:
            try:
                values = cursor.fetchone()
            except dbapi_error as exc:
                raise failed(exc, f"row {len(rows) + 1}: ") from None
            if values is None:
                return _Result(labels, rows)
            rows.append([_text(value) for value in values])
    finally:
        with suppress(Exception):
            cursor.close()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


_WRITE_PRIVILEGES = "INSERT, UPDATE, DELETE, TRUNCATE"


def _relations(plan: object) -> set[tuple[str, str]]:
    """(schema, table) of every relation an EXPLAIN (VERBOSE, FORMAT JSON) plan reads."""
    found: set[tuple[str, str]] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Relation Name" in node:
                found.add((str(node.get("Schema", "public")), str(node["Relation Name"])))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _write_warnings(conn: Connection, query: str, origin: str) -> list[str]:
    """PostgreSQL: a warning naming the role when it may write to a table the query reads.

    No client-side check can stop a function with side effects (``dblink_exec``, ...); a
    role that can only read can. Best effort: nothing is said when the check itself fails.
    """
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        return []
    cursor = conn.connection.cursor()
    try:
        cursor.execute(f"EXPLAIN (VERBOSE, FORMAT JSON)\n{query}", prepare=True)  # type: ignore[call-arg]
        plan = [row[0] for row in cursor.fetchall()]
        plan = [json.loads(p) if isinstance(p, str) else p for p in plan]
        relations = sorted(_relations(plan))
        if not relations:
            return []
        cursor.execute(
            "SELECT current_user, n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN unnest(%s::text[], %s::text[]) AS r(nspname, relname)"
            " ON r.nspname = n.nspname AND r.relname = c.relname"
            f" WHERE has_table_privilege(c.oid, '{_WRITE_PRIVILEGES}')"
            " ORDER BY 2, 3",
            ([schema for schema, _ in relations], [name for _, name in relations]),
        )
        writable = cursor.fetchall()
    except (conn.dialect.loaded_dbapi.Error, ValueError, TypeError):  # never break the command
        return []
    finally:
        with suppress(Exception):
            cursor.close()
    if not writable:
        return []
    role = str(writable[0][0])
    tables = ", ".join(
        _one_line(str(name) if schema == "public" else f"{schema}.{name}")
        for _, schema, name in writable
    )
    return [
        f"{origin}: the role {_quote(role)} can write to {tables} (which the query reads);"
        " connect --db as a role that may only SELECT (see the README, 'Course database')"
    ]


_AS_HINT = " (name it in the query, e.g. SELECT address AS email)"


def _cached_rows(layout: _Layout, rows: list[list[str]]) -> _Rows:
    def recipients(header_columns: Iterable[str] | None) -> Iterator[Recipient]:
        builder = _Builder(layout, header_columns)
        for row, values in enumerate(rows, 1):
            yield builder.build(row, values)

    return recipients


def open_db(url: str, query: str | None = None, *, timeout: float = QUERY_TIMEOUT) -> Source:
    """Open the recipients a single SELECT/WITH query returns from any SQLAlchemy URL.

    The query runs once, here, in a read-only transaction that is rolled back, as a single
    statement that the database stops after ``timeout`` seconds (SQLite files are opened
    read-only and never created); iterating the source rebuilds the recipients from the
    rows it returned. Raises InputError for a bad URL or query, a failing query, a result
    without an email column or with no rows. PostgreSQL: ``Source.warnings`` names the role
    when it could write to the tables the query reads.
    """
    parsed = _parse_url(url)
    origin = _one_line(parsed.render_as_string(hide_password=True))
    sql = _check_query(DEFAULT_QUERY if query is None else query)
    with _read_only(parsed, origin, timeout) as conn:
        result = _run(conn, sql, origin, timeout)
        layout = _layout(origin, result.labels, "query result", _AS_HINT)
        if not result.rows:
            raise InputError(f"{origin}: the query returned no rows")
        warnings = _write_warnings(conn, sql, origin)
    return Source(origin, layout.keys, _cached_rows(layout, result.rows), warnings)


def recheck_location(url: str) -> str:
    """The database URL as a job records it for ``--recheck``: its password replaced by
    ``***`` (a worker finds the real URL in BULKMAIL_DB or the config then) and a SQLite
    file's path made absolute (a worker started by cron runs in another directory)."""
    parsed = _parse_url(url)
    database = parsed.database or ""
    if (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not database.startswith("file:")
    ):
        parsed = parsed.set(database=str(Path(database).absolute()))
    if "password" in parsed.query:  # libpq takes one there too: recorded as user:***@ instead
        parsed = parsed.difference_update_query(["password"]).set(password="***")
    return parsed.render_as_string(hide_password=True)


def query_addresses(url: str, query: str, *, timeout: float = QUERY_TIMEOUT) -> frozenset[str]:
    """The addresses ``query`` returns now (``--recheck``), lower-cased as the job store keys
    them, each normalised as the job's recipients were (a valid address as it is sent, any
    other as given): read-only and stopped after ``timeout`` seconds, as ``open_db`` runs
    it. No rows is an answer (nobody is due any more); InputError when the query fails or
    its result has no email column."""
    parsed = _parse_url(url)
    origin = _one_line(parsed.render_as_string(hide_password=True))
    sql = _check_query(query)
    with _read_only(parsed, origin, timeout) as conn:
        result = _run(conn, sql, origin, timeout)
    layout = _layout(origin, result.labels, "query result", _AS_HINT)
    column = layout.positions[layout.keys.index("email")]
    found: set[str] = set()
    for values in result.rows:
        address = values[column].strip() if column < len(values) else ""
        if not address:
            continue
        with suppress(EmailNotValidError):
            address = _deliverable(address)
        found.add(address.lower())
    return frozenset(found)


# --------------------------------------------------------------------------- selection


def _address_key(address: str) -> str:
    """How addresses are compared: normalised by email-validator when valid, case-folded."""
    address = address.strip()
    with suppress(EmailNotValidError):
        address = _deliverable(address)
    return address.casefold()


def select(
    recipients: Iterable[Recipient], only: Sequence[str], exclude: Sequence[str]
) -> Iterator[Recipient]:
    """Keep the recipients in ``only`` (all if it is empty), then drop those in ``exclude``.

    Lazy: the check that every ``only`` address matched a row (so a typo does not send to
    nobody) runs once ``recipients`` is exhausted, raising InputError then; consume the
    result fully (e.g. with ``list``) before acting on it.
    """
    for option, values in (("--only", only), ("--exclude", exclude)):
        if any(not value.strip() for value in values):
            raise InputError(f"{option}: empty address")
    wanted = {_address_key(value): value.strip() for value in only}
    unwanted = {_address_key(value) for value in exclude}
    matched: set[str] = set()
    if not wanted and not unwanted:
        yield from recipients
        return
    for recipient in recipients:
        # a recipient's address is already normalised (or kept as given when invalid)
        key = recipient.email.strip().casefold()
        if wanted:
            if key not in wanted:
                continue
            matched.add(key)
        if key in unwanted:
            continue
        yield recipient
    missing = [_one_line(value) for key, value in wanted.items() if key not in matched]
    if missing:
        raise InputError(f"--only {', '.join(missing)}: not in the recipients")
