"""Recipients from a CSV file or the course database, normalised, validated and de-duplicated.

``open_csv`` / ``open_db`` check eagerly what they can (the file or database, the header or
result columns, at least one data row) and return a ``Source``: iterating it streams one
``Recipient`` per data row, re-reading the file or re-running the query each time. Rows that
must not be sent (bad or missing address, duplicate, a value that is unsafe in a mail header:
CR, LF, NUL, other controls, Unicode line separators, an encoded word decoding to one of those;
see ``bulkmail.headersafe``) are still yielded, with ``skip_reason`` set, so nothing is dropped
silently and ``compose`` never meets a value it would refuse. Every user error is an ``InputError``
whose one-line message names the file or database, the row and the column at fault.
"""

from __future__ import annotations

import csv
import functools
import re
import sqlite3
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from bulkmail.errors import InputError
from bulkmail.headersafe import header_safe_problem
from bulkmail.models import Recipient

__all__ = [
    "DEFAULT_QUERY",
    "EMAIL_ALIASES",
    "NAME_ALIASES",
    "Source",
    "open_csv",
    "open_db",
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


class Source:
    """Recipients from one CSV file or database query; iterate to stream them (repeatably)."""

    def __init__(
        self, description: str, columns: Sequence[str], rows: Callable[[], Iterator[Recipient]]
    ) -> None:
        self.description = description  # for messages: the path, or the URL without password
        self.columns = list(columns)  # template variables: 'email', 'name'?, the other columns
        self._rows = rows

    def __iter__(self) -> Iterator[Recipient]:
        return self._rows()

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


@dataclass
class _Builder:
    """Turns raw rows into Recipients, remembering addresses already seen."""

    layout: _Layout
    seen: dict[str, int] = field(default_factory=dict)

    def build(self, row: int, raw: Sequence[str]) -> Recipient:
        fields: dict[str, str] = {}
        reason: str | None = None
        for label, key, pos in zip(
            self.layout.labels, self.layout.keys, self.layout.positions, strict=True
        ):
            value = raw[pos] if pos < len(raw) else ""
            if reason is None:
                problem = header_safe_problem(value)
                if problem is not None:
                    reason = f"column {_quote(label)} {problem}"
            fields[key] = value.strip()
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


class _NotUtf8(Exception):
    """Raised by _Lines so the reader can name the row being read."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


_BARE_CR = re.compile(rb"(?<=\r)(?!\n)")


class _Lines:
    """The file's physical lines, decoded as UTF-8 one at a time (a BOM is dropped).

    Lines end with LF, CRLF or a bare CR (old Mac exports), as in an editor; the csv module
    joins the lines of a quoted multi-line value itself.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self.count = 0  # physical lines read so far

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if not self._pending:
            data = self._stream.readline()
            if not data:
                raise StopIteration
            self._pending = [piece for piece in _BARE_CR.split(data) if piece]
            self._pending.reverse()
        data = self._pending.pop()
        self.count += 1
        try:
            return data.decode("utf-8-sig" if self.count == 1 else "utf-8")
        except UnicodeDecodeError:
            raise _NotUtf8(self.count) from None


def _open_binary(path: Path, origin: str) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{origin}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{origin}: is a directory, expected a CSV file") from None
    except PermissionError:
        raise InputError(f"{origin}: cannot read (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{origin}: cannot read ({_one_line(exc.strerror or str(exc))})") from None


def _sniff_delimiter(line: str) -> str:
    """';' when the header line has more semicolons than commas outside quotes, else ','."""
    counts = {",": 0, ";": 0}
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    return ";" if counts[";"] > counts[","] else ","


def _is_blank(record: Sequence[str]) -> bool:
    return all(not value.strip() for value in record)


def _records(path: Path, origin: str) -> Generator[tuple[int, list[str]], None, None]:
    """(line where the record starts, fields) for every non-blank record, header included."""
    with _open_binary(path, origin) as stream:
        lines = _Lines(stream)
        delimiter = ","
        try:
            for line in lines:
                if line.strip():
                    delimiter = _sniff_delimiter(line)
                    break
        except _NotUtf8 as exc:
            raise InputError(
                f"{origin}: row {exc.line}: not valid UTF-8 (save the file as UTF-8)"
            ) from None
        stream.seek(0)
        lines = _Lines(stream)
        reader = csv.reader(lines, delimiter=delimiter, skipinitialspace=True, strict=True)
        while True:
            start = lines.count + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except _NotUtf8 as exc:
                where = f"row {start}" + (f" (line {exc.line})" if exc.line != start else "")
                raise InputError(
                    f"{origin}: {where}: not valid UTF-8 (save the file as UTF-8)"
                ) from None
            except csv.Error as exc:
                problem = _one_line(str(exc))
                if problem == "unexpected end of data":
                    problem = 'a quoted value starting here is never closed (a stray ")'
                raise InputError(f"{origin}: row {start}: malformed CSV: {problem}") from None
            if not _is_blank(record):
                yield start, record


def _csv_header(path: Path, origin: str) -> tuple[_Layout, bool]:
    """The layout from the header row, and whether at least one data row follows."""
    records = _records(path, origin)
    try:
        first = next(records, None)
        if first is None:
            raise InputError(f"{origin}: empty file, expected a header row")
        layout = _layout(origin, [label.strip() for label in first[1]], "header")
        return layout, next(records, None) is not None
    finally:
        records.close()


def _csv_rows(path: Path, origin: str) -> Iterator[Recipient]:
    records = _records(path, origin)
    try:
        header = next(records, None)
        if header is None:
            return
        layout = _layout(origin, [label.strip() for label in header[1]], "header")
        builder = _Builder(layout)
        for row, record in records:
            if len(record) > layout.width and not _is_blank(record[layout.width :]):
                raise InputError(
                    f"{origin}: row {row}: {len(record)} fields but the header has"
                    f" {layout.width} columns (quote values that contain the delimiter)"
                )
            yield builder.build(row, record)
    finally:
        records.close()


def open_csv(path: str | Path) -> Source:
    """Open a CSV of recipients: UTF-8, ',' or ';', a header row with an email column.

    Raises InputError now for an unreadable or empty file, a bad header or no data row;
    iterating may raise it for a row that is not UTF-8 or has too many fields.
    """
    file = Path(path)
    origin = _one_line(str(path))
    layout, has_rows = _csv_header(file, origin)
    if not has_rows:
        raise InputError(f"{origin}: no data rows below the header")
    return Source(origin, layout.keys, lambda: _csv_rows(file, origin))


# --------------------------------------------------------------------------- database


_WORD = re.compile(r"[(\s]*([A-Za-z_]+)")


def _split_sql(sql: str, *, backslash: bool, hash_comments: bool, brackets: bool) -> list[str]:
    """The statements in ``sql`` (comments removed, empty ones dropped), for one SQL dialect.

    Dialects disagree on backslash escapes, '#' comments and [bracketed] names, so the
    caller checks every combination: a query is accepted only if all of them see one
    statement.
    """
    statements: list[str] = []
    code: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`" or (brackets and ch == "["):
            close = "]" if ch == "[" else ch
            j = i + 1
            while j < n:
                if backslash and sql[j] == "\\" and ch != "[":
                    j += 2
                    continue
                if sql[j] == close:
                    if close != "]" and sql.startswith(close * 2, j):
                        j += 2
                        continue
                    break
                j += 1
            code.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i) or (hash_comments and ch == "#"):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            code.append(" ")
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
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
    """The query without a trailing ';' if it is one SELECT or WITH statement, else raise."""
    for backslash in (False, True):
        for hash_comments in (False, True):
            for brackets in (False, True):
                statements = _split_sql(
                    query, backslash=backslash, hash_comments=hash_comments, brackets=brackets
                )
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
                    raise InputError(
                        "--query: only a single SELECT or WITH statement is accepted" + shown
                    )
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
    """An engine for ``parsed``; SQLite files are opened read-only and must exist."""
    kwargs: dict[str, Any] = {"poolclass": NullPool}
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database.startswith("file:"):
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
def _read_only(parsed: URL, origin: str) -> Iterator[Connection]:
    """A connection in a read-only transaction that is always rolled back, then disposed."""
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
                    elif backend == "postgresql":
                        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                except SQLAlchemyError as exc:
                    raise InputError(
                        f"{origin}: cannot start a read-only transaction ({_first_line(exc)})"
                    ) from None
                yield conn
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def _run(conn: Connection, query: str, origin: str) -> CursorResult[Any]:
    try:
        # no_parameters: the SQL goes to the driver verbatim, '%' and ':x' included.
        return conn.execution_options(no_parameters=True).exec_driver_sql(query)
    except SQLAlchemyError as exc:
        raise InputError(f"{origin}: query failed: {_first_line(exc)}") from None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


_AS_HINT = " (name it in the query, e.g. SELECT address AS email)"


def _db_rows(parsed: URL, query: str, origin: str) -> Iterator[Recipient]:
    with _read_only(parsed, origin) as conn:
        result = _run(conn, query, origin)
        layout = _layout(origin, list(map(str, result.keys())), "query result", _AS_HINT)
        builder = _Builder(layout)
        row = 0
        while True:
            try:
                values = result.fetchone()
            except SQLAlchemyError as exc:
                raise InputError(
                    f"{origin}: row {row + 1}: query failed: {_first_line(exc)}"
                ) from None
            if values is None:
                return
            row += 1
            yield builder.build(row, [_text(value) for value in values])


def open_db(url: str, query: str | None = None) -> Source:
    """Open the recipients a single SELECT/WITH query returns from any SQLAlchemy URL.

    The query runs in a read-only transaction that is rolled back (SQLite files are opened
    read-only and never created). Raises InputError now for a bad URL or query, a failing
    query, a result without an email column or with no rows.
    """
    parsed = _parse_url(url)
    origin = _one_line(parsed.render_as_string(hide_password=True))
    sql = _check_query(DEFAULT_QUERY if query is None else query)
    with _read_only(parsed, origin) as conn:
        result = _run(conn, sql, origin)
        layout = _layout(origin, list(map(str, result.keys())), "query result", _AS_HINT)
        try:
            empty = result.fetchone() is None
        except SQLAlchemyError as exc:
            raise InputError(f"{origin}: query failed: {_first_line(exc)}") from None
        finally:
            result.close()
    if empty:
        raise InputError(f"{origin}: the query returned no rows")
    return Source(origin, layout.keys, lambda: _db_rows(parsed, sql, origin))


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
