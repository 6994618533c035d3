"""Sources: CSV files and the course database, read for real from files in tmp_path."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from email_validator import validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkmail.errors import InputError
from bulkmail.headersafe import header_safe_problem
from bulkmail.models import Recipient
from bulkmail.sources import DEFAULT_QUERY, open_csv, open_db, select

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
JOIN = (
    "SELECT i.name, i.email, c.code AS course, c.title, c.starts_on"
    " FROM instructors i JOIN courses c ON c.instructor_id = i.id"
)


def write(name: str, content: str | bytes) -> Path:
    path = Path(name)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def write_rows(name: str, rows: Sequence[Sequence[str]], delimiter: str = ",") -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter).writerows(rows)
    return write(name, buffer.getvalue())


def load(name: str, content: str | bytes) -> list[Recipient]:
    return list(open_csv(write(name, content)))


def error(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(InputError) as info:
        result = call(*args)
        if result is not None:
            list(result)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --------------------------------------------------------------------------- CSV


def test_example_csv_loads() -> None:
    source = open_csv(EXAMPLES / "instructors.csv")
    recipients = list(source)
    assert len(recipients) >= 10
    assert all(r.skip_reason is None for r in recipients)
    assert source.columns[:2] == ["name", "email"]
    assert {"Zoë Ångström", "José Núñez"} <= {r.name for r in recipients}
    assert [r.row for r in recipients] == list(range(2, len(recipients) + 2))
    for r in recipients:
        assert r.email.rpartition("@")[2] in {"example.edu", "example.org"}
        assert set(r.fields) == set(source.columns)


def test_fields_and_normalisation() -> None:
    text = "name,email,Course \n  Ada Lovelace ,  Ada@EXAMPLE.EDU ,CS1\n"
    source = open_csv(write("a.csv", text))
    assert source.description == "a.csv"
    assert source.columns == ["name", "email", "Course"]
    [r] = list(source)
    assert r == Recipient(
        row=2,
        email="Ada@example.edu",
        name="Ada Lovelace",
        fields={"name": "Ada Lovelace", "email": "Ada@example.edu", "Course": "CS1"},
    )


def test_can_iterate_twice() -> None:
    source = open_csv(write("a.csv", "email\na@example.edu\nb@example.edu\na@example.edu\n"))
    first, second = list(source), list(source)
    assert first == second
    assert [r.skip_reason for r in first] == [None, None, "duplicate of row 2"]


def test_bom_is_stripped() -> None:
    source = open_csv(write("bom.csv", "\ufeffEmail,Name\nzoe@example.edu,Zoë\n".encode()))
    assert source.columns == ["email", "name"]
    assert [(r.email, r.name) for r in source] == [("zoe@example.edu", "Zoë")]


def test_semicolon_delimiter() -> None:
    text = "Name;E-Mail;Course\nJosé Núñez;jose@example.edu;Calculus I, Section B\n"
    [r] = load("semi.csv", text)
    assert (r.name, r.email, r.fields["Course"]) == (
        "José Núñez",
        "jose@example.edu",
        "Calculus I, Section B",
    )


def test_quoted_fields_with_commas_and_newlines() -> None:
    text = (
        "name,email,title\r\n"
        '"Okafor, Ben",ben@example.edu,"Data Structures, part 1"\r\n'
        'Ada,ada@example.edu,"two\nlines"\r\n'
        "Chen,chen@example.edu,Chemistry\r\n"
    )
    ben, ada, chen = load("q.csv", text)
    assert (ben.name, ben.fields["title"], ben.skip_reason) == (
        "Okafor, Ben",
        "Data Structures, part 1",
        None,
    )
    # A value with a line break could reach a header through a template: skipped, named.
    assert ada.skip_reason == "column 'title' contains a line feed (LF)"
    # Rows are numbered as an editor shows the lines where records start.
    assert [ben.row, ada.row, chen.row] == [2, 3, 5]
    assert chen.skip_reason is None


def test_blank_lines_ignored_but_counted() -> None:
    text = "\nname,email\n\na,a@example.edu\n   \n,,\n\nb,b@example.edu\n\n"
    recipients = load("blank.csv", text)
    assert [(r.row, r.email) for r in recipients] == [(4, "a@example.edu"), (8, "b@example.edu")]


@pytest.mark.parametrize(
    ("email_header", "name_header"),
    [
        ("E-Mail", "Full Name"),
        ("Mail", "NAME"),
        ("  EMAIL  ", " fullname "),
        ("e_mail", "Instructor"),
        ("Email Address", "Display Name"),
        ("address", "full_name"),
    ],
)
def test_header_aliases_case_insensitive(email_header: str, name_header: str) -> None:
    source = open_csv(write("h.csv", f"{name_header},{email_header},Room\nZoë,z@example.edu,B2\n"))
    assert source.columns == ["name", "email", "Room"]
    [r] = list(source)
    assert (r.name, r.email, r.fields["Room"]) == ("Zoë", "z@example.edu", "B2")


def test_best_alias_wins_and_others_stay_variables() -> None:
    text = "Address,Email,Instructor,Name\n1 Main St,a@example.edu,x,Ada\n"
    source = open_csv(write("h.csv", text))
    assert source.columns == ["Address", "email", "Instructor", "name"]
    [r] = list(source)
    assert (r.email, r.name, r.fields["Address"]) == ("a@example.edu", "Ada", "1 Main St")


def test_no_name_column_gives_empty_name() -> None:
    [r] = load("n.csv", "email,course\na@example.edu,CS1\n")
    assert r.name == ""
    assert "name" not in r.fields


def test_missing_email_column_names_file_and_found_columns() -> None:
    path = write("instructors.csv", "name,course\nAda,CS1\n")
    message = error(open_csv, path)
    assert message.startswith("instructors.csv: no 'email' column (found: name, course); ")
    assert "accepted names: email, e-mail" in message


def test_headerless_file_gets_a_hint() -> None:
    message = error(open_csv, write("x.csv", "Ada,ada@example.edu\n"))
    assert "no 'email' column" in message
    assert "add a header row" in message


def test_duplicate_header_is_an_error() -> None:
    message = error(open_csv, write("d.csv", "name,email,Course,course\n"))
    assert message == "d.csv: column 'course' appears twice in the header (rename one of them)"


def test_two_equally_good_email_columns_are_an_error() -> None:
    message = error(open_csv, write("d.csv", "email,E-Mail\na@example.edu,b@example.edu\n"))
    assert message == (
        "d.csv: columns 'email' and 'E-Mail' both look like the email column; rename one of them"
    )


def test_not_utf8_names_the_row() -> None:
    text = "name,email\nAda,a@example.edu\nJosé,j@example.edu\n"
    path = write("latin.csv", text.encode("latin-1"))
    source = open_csv(path)  # the header and first row are fine
    message = error(lambda: list(source))
    assert message == (
        "latin.csv: row 3: not valid UTF-8 (save the file as UTF-8, or name its encoding:"
        " --encoding cp1252 is what Excel on Windows writes)"
    )


def test_not_utf8_header() -> None:
    message = error(open_csv, write("latin.csv", "Name,E-Mail,Straße\n".encode("cp1252")))
    assert message == (
        "latin.csv: row 1: not valid UTF-8 (save the file as UTF-8, or name its encoding:"
        " --encoding cp1252 is what Excel on Windows writes)"
    )


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\ufeff"])
def test_empty_file(content: str) -> None:
    assert error(open_csv, write("e.csv", content)) == "e.csv: empty file, expected a header row"


def test_header_without_rows() -> None:
    message = error(open_csv, write("h.csv", "name,email\n\n"))
    assert message == "h.csv: no data rows below the header"


def test_missing_file_and_directory() -> None:
    assert error(open_csv, "nope.csv") == "nope.csv: no such file"
    Path("dir.csv").mkdir()
    assert error(open_csv, "dir.csv").startswith("dir.csv: is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file() -> None:
    path = write("secret.csv", "email\na@example.edu\n")
    path.chmod(0)
    assert error(open_csv, path) == "secret.csv: cannot read (permission denied)"


def test_row_with_too_many_fields() -> None:
    source = open_csv(write("w.csv", "name,email\nA,a@example.edu\nSmith, John,j@example.edu\n"))
    message = error(lambda: list(source))
    assert message.startswith("w.csv: row 3: 3 fields but the header has 2 columns")


def test_trailing_empty_fields_and_short_rows_are_fine() -> None:
    recipients = load("t.csv", "name,email,course\nA,a@example.edu,CS1,,\nB,b@example.edu\n")
    assert [r.fields["course"] for r in recipients] == ["CS1", ""]
    assert all(r.skip_reason is None for r in recipients)


def test_unclosed_quote_is_an_error_not_a_swallowed_file() -> None:
    text = 'name,email\nA,a@example.edu\nB,"b@example.edu\nC,c@example.edu\nD,d@example.edu\n'
    source = open_csv(write("u.csv", text))
    message = error(lambda: list(source))
    assert message.startswith("u.csv: row 3: malformed CSV: a quoted value starting here")


def test_old_mac_line_endings_and_spaces_after_delimiter() -> None:
    text = 'name, email\r"Okafor, Ben", "ben@example.edu"\r\rAda, ada@example.edu'
    recipients = load("mac.csv", text)
    assert [(r.row, r.name, r.email) for r in recipients] == [
        (2, "Okafor, Ben", "ben@example.edu"),
        (4, "Ada", "ada@example.edu"),
    ]


def test_invalid_empty_and_duplicate_addresses_are_skipped_with_reasons() -> None:
    text = (
        "name,email\n"
        "Ada,Ada@Example.edu\n"
        "Bad,not-an-address\n"
        "Nobody,\n"
        "Ada again,ada@EXAMPLE.EDU\n"
        "Dotty,dot..dot@example.edu\n"
        "Ben,ben@example.edu\n"
    )
    recipients = load("s.csv", text)
    reasons = {r.row: r.skip_reason for r in recipients}
    assert reasons[2] is None and reasons[7] is None
    assert reasons[3] is not None and reasons[3].startswith("invalid address: ")
    assert reasons[4] == "no email address"
    assert reasons[5] == "duplicate of row 2"
    assert reasons[6] is not None and reasons[6].startswith("invalid address: ")
    assert recipients[1].email == "not-an-address"  # kept as given, to show in the report


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("Ada\nLovelace", "contains a line feed (LF)"),
        ("Ada\rLovelace", "contains a carriage return (CR)"),
        ("Ada\x00Lovelace", "contains a NUL character"),
        ("Ada\r\n", "contains a carriage return (CR)"),
        ("Ada\u2028Lovelace", "contains a line separator (U+2028)"),
        ("Ada\x85Lovelace", "contains a line separator (U+0085)"),
        ("Ada\x0bLovelace", "contains a line separator (U+000B)"),
        ("Ada\x0cLovelace", "contains a line separator (U+000C)"),
        ("Ada\x7fLovelace", "contains a control character (U+007F)"),
        ("Ada\x1b[31mLovelace", "contains a control character (U+001B)"),
        ("Ada =?UTF-8?Q?=0A?=Bcc: x@example.org", "has an encoded word '=?UTF-8?Q?=0A?=' that"),
        ("=?utf-8?b?DQpCY2M6IHhAeS56?=", "has an encoded word '=?utf-8?b?DQpCY2M6IHhAeS56?='"),
    ],
)
def test_header_unsafe_name_is_skipped(bad: str, problem: str) -> None:
    """Everything compose would refuse in a header makes the row skipped here (not the whole
    command fail later): the one shared definition is ``bulkmail.headersafe``."""
    path = write_rows(
        "cr.csv", [["name", "email"], [bad, "ada@example.edu"], ["Ada", "ada@example.edu"]]
    )
    first, second = list(open_csv(path))
    assert first.skip_reason is not None
    assert first.skip_reason.startswith(f"column 'name' {problem}")
    assert "\n" not in first.skip_reason and "\r" not in first.skip_reason
    # The skipped row does not count as sent: the clean row for the same address goes out.
    assert second.skip_reason is None


def test_line_break_in_any_column_is_skipped() -> None:
    rows = [["Mail", "Course"], ["a@example.edu", "CS1\r\nBcc: x@example.org"]]
    path = write_rows("cr.csv", rows)
    [r] = list(open_csv(path))
    assert r.skip_reason == "column 'Course' contains a carriage return (CR)"


def test_internationalised_domain_is_sent_in_ascii_form() -> None:
    """The To header must stay ASCII for a Unicode domain (EmailMessage would otherwise put an
    encoded word in the address); the punycode form is the same mailbox, and duplicates are
    found across both spellings."""
    text = "email\nada@Bücher.example\nADA@xn--bcher-kva.example\nzoë@example.org\n"
    ada, twin, zoe = load("idn.csv", text)
    assert (ada.email, ada.skip_reason) == ("ada@xn--bcher-kva.example", None)
    assert twin.skip_reason == "duplicate of row 2"
    assert (zoe.email, zoe.skip_reason) == ("zoë@example.org", None)  # needs SMTPUTF8
    assert [r.email for r in select([ada, zoe], ["ADA@bücher.example"], [])] == [ada.email]


def test_encoded_word_in_the_address_is_skipped() -> None:
    """'=?utf-8?q?=0A?=' is a valid local part to email-validator, yet a reader decoding the
    To header would see a line feed."""
    [r] = load("ew.csv", "name,email\nEve,=?utf-8?q?=0A?=@example.org\n")
    assert r.skip_reason == (
        "column 'email' has an encoded word '=?utf-8?q?=0A?=' that decodes to a line feed (LF)"
    )


# --------------------------------------------------------------------------- property


cell = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.emails(),
    st.sampled_from(
        ["a@example.edu", " A@EXAMPLE.EDU ", "a@example.edu\n", "", " ", "x@@y", "é@example.org"]
    ),
    st.sampled_from(
        ["Eve\u2028x", "a\x85b", "=?UTF-8?Q?=0A?=", "=?utf-8?q?=0A?=@example.org", "v\x0bt"]
    ),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(cell, cell, cell), min_size=1, max_size=6))
def test_any_text_yields_one_recipient_per_row(rows: list[tuple[str, str, str]]) -> None:
    path = write_rows("prop.csv", [("name", "email", "notes"), *rows])
    data_rows = [row for row in rows if any(value.strip() for value in row)]
    if not data_rows:
        assert "no data rows" in error(open_csv, path)
        return
    recipients = list(open_csv(path))
    assert len(recipients) == len(data_rows)
    assert [r.row for r in recipients] == sorted({r.row for r in recipients})
    sendable = [r for r in recipients if r.skip_reason is None]
    for r in sendable:
        validate_email(r.email, check_deliverability=False)
        for value in (r.name, r.email, *r.fields.values()):
            assert header_safe_problem(value) is None
    assert len({r.email.casefold() for r in sendable}) == len(sendable)


# --------------------------------------------------------------------------- database


@pytest.fixture(scope="module")
def built_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "course.db"
    script = EXAMPLES / "make_course_db.py"
    done = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, check=True
    )
    assert "12 instructors" in done.stdout
    again = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
    return path


@pytest.fixture
def course_db(built_db: Path) -> Iterator[Path]:
    path = Path("course.db")
    shutil.copyfile(built_db, path)
    before = path.read_bytes()
    yield path
    assert path.read_bytes() == before, "the database must never be written"


def count(path: Path, table: str = "instructors") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_db_default_query(course_db: Path) -> None:
    source = open_db("sqlite:///course.db")
    assert source.description == "sqlite:///course.db"
    assert source.columns == ["name", "email"]
    recipients = list(source)
    assert len(recipients) == 12
    assert [r.row for r in recipients] == list(range(1, 13))
    assert all(r.skip_reason is None for r in recipients)
    assert "Zoë Ångström" in {r.name for r in recipients}
    assert list(source) == recipients
    assert open_db("sqlite:///course.db", DEFAULT_QUERY).columns == ["name", "email"]


def test_db_matches_example_csv(course_db: Path) -> None:
    from_db = {(r.name, r.email) for r in open_db("sqlite:///course.db")}
    from_csv = {(r.name, r.email) for r in open_csv(EXAMPLES / "instructors.csv")}
    assert from_db == from_csv


def test_db_join_query(course_db: Path) -> None:
    query = f"-- every course; one row each\n{JOIN}\nORDER BY c.code; -- done\n"
    source = open_db(f"sqlite:///{course_db.resolve()}", query)
    assert source.columns == ["name", "email", "course", "title", "starts_on"]
    recipients = list(source)
    assert len(recipients) == 12
    first = recipients[0]
    assert first.fields["course"] == "BIO120"
    assert first.fields["starts_on"] == "2025-09-15"


def test_db_semicolons_in_strings_are_fine(course_db: Path) -> None:
    query = "SELECT name, email, 'a;b' AS note FROM instructors WHERE name <> ';'"
    assert [r.fields["note"] for r in open_db("sqlite:///course.db", query)][:1] == ["a;b"]


def test_db_query_without_email_column(course_db: Path) -> None:
    message = error(open_db, "sqlite:///course.db", "SELECT id, name FROM instructors")
    assert message.startswith("sqlite:///course.db: no 'email' column (found: id, name)")


def test_db_alias_and_values_as_text(course_db: Path) -> None:
    query = 'SELECT email AS "E-Mail", id, NULL AS empty, 1.5 AS x FROM instructors'
    source = open_db("sqlite:///course.db", query)
    assert source.columns == ["email", "id", "empty", "x"]
    r = next(iter(source))
    assert r.fields == {"email": "ada.whitfield@example.edu", "id": "1", "empty": "", "x": "1.5"}
    assert r.name == ""


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM instructors",
        "UPDATE instructors SET email = 'x@example.org'",
        "SELECT 1; DROP TABLE instructors",
        "SELECT name, email FROM instructors; DELETE FROM instructors;",
        "select 'a\\'; DELETE FROM instructors; --'",
        "/* SELECT */ DROP TABLE instructors",
        "PRAGMA query_only = OFF",
        "",
        "  ;  ",
    ],
)
def test_db_only_one_select_is_accepted(course_db: Path, query: str) -> None:
    message = error(open_db, "sqlite:///course.db", query)
    assert message.startswith("--query: ")
    assert count(course_db) == 12
    assert count(course_db, "courses") == 12


def test_db_query_errors_are_one_line(course_db: Path) -> None:
    message = error(open_db, "sqlite:///course.db", "SELECT name, email FROM teachers")
    assert message == "sqlite:///course.db: query failed: no such table: teachers"
    message = error(open_db, "sqlite:///course.db", "SELECT name email FROM")
    assert message.startswith("sqlite:///course.db: query failed: ")


def test_db_no_rows(course_db: Path) -> None:
    message = error(open_db, "sqlite:///course.db", f"{DEFAULT_QUERY} WHERE id > 100")
    assert message == "sqlite:///course.db: the query returned no rows"


def test_db_missing_file_is_not_created() -> None:
    message = error(open_db, "sqlite:///missing.db")
    assert message == "sqlite:///missing.db: no such database file 'missing.db'"
    assert not Path("missing.db").exists()


def test_db_bad_url_and_masked_password() -> None:
    assert error(open_db, "not a url").startswith("--db: not a valid database URL")
    message = error(open_db, "postgresql://office:s3cret@127.0.0.1:1/courses")
    assert "s3cret" not in message
    assert message.startswith("postgresql://office:***@127.0.0.1:1/courses: ")


def test_db_skips_rows_like_csv(tmp_path: Path) -> None:
    with sqlite3.connect("odd.db") as conn:
        conn.execute("CREATE TABLE people (name TEXT, email TEXT, note TEXT)")
        conn.executemany(
            "INSERT INTO people VALUES (?, ?, ?)",
            [
                ("Ada", "ada@example.edu", None),
                ("Ada twin", "ADA@example.edu", ""),
                ("Nul", None, ""),
                ("Evil", "evil@example.org", "x\r\nBcc: all@example.org"),
            ],
        )
    conn.close()
    recipients = list(open_db("sqlite:///odd.db", "SELECT * FROM people"))
    assert [(r.row, r.skip_reason) for r in recipients] == [
        (1, None),
        (2, "duplicate of row 1"),  # the whole address is compared case-insensitively
        (3, "no email address"),
        (4, "column 'note' contains a carriage return (CR)"),
    ]
    assert recipients[1].email == "ADA@example.edu"


def test_db_duplicate_result_columns(course_db: Path) -> None:
    message = error(
        open_db,
        "sqlite:///course.db",
        "SELECT i.name, i.email, c.title AS name FROM instructors i JOIN courses c"
        " ON c.instructor_id = i.id",
    )
    assert "column 'name' appears twice in the query result" in message


@pytest.mark.parametrize(
    "query",
    [
        # PostgreSQL reads these as several statements: refused whatever the database
        "SELECT name, email FROM instructors /* /* */ ' */; DELETE FROM instructors; -- '",
        "SELECT name, email FROM instructors WHERE name <> $a$ ' $a$; DELETE FROM courses; -- '",
        "SELECT name, email FROM instructors WHERE name <> $$ ' $$; DELETE FROM courses; -- '",
    ],
)
def test_db_nested_comments_and_dollar_quotes_hide_no_statement(
    course_db: Path, query: str
) -> None:
    message = error(open_db, "sqlite:///course.db", query)
    assert message.startswith("--query: only a single SELECT or WITH statement")


@pytest.mark.parametrize(
    "query",
    [
        "SELECT name, email FROM instructors WHERE name <> 'a$b$; c'",
        'SELECT name AS "n$a$", email FROM instructors -- $a$ ;',
        "SELECT name, email FROM instructors /* a $$ ; */",
        "SELECT name, email FROM instructors WHERE email LIKE '%example.edu' AND name <> ':x'",
    ],
)
def test_db_dollars_and_comments_in_a_single_statement_are_fine(
    course_db: Path, query: str
) -> None:
    assert len(list(open_db("sqlite:///course.db", query))) >= 10


def test_db_sqlite_itself_refuses_a_second_statement(course_db: Path) -> None:
    """Below the splitter: sqlite3 runs one statement per execute, whatever the text."""
    from sqlalchemy import make_url

    from bulkmail.sources import _read_only, _run

    with pytest.raises(InputError, match="one statement at a time"):  # noqa: SIM117
        with _read_only(make_url("sqlite:///course.db"), "db", 5.0) as conn:
            _run(conn, "SELECT name, email FROM instructors; DELETE FROM instructors", "db", 5.0)
    assert count(course_db) == 12


def test_db_query_is_stopped_after_the_timeout(course_db: Path) -> None:
    endless = (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n)"
        " SELECT 'a' AS name, 'a@example.edu' AS email FROM n WHERE x < 0"
    )
    started = time.monotonic()
    message = error(lambda: open_db("sqlite:///course.db", endless, timeout=0.2))
    assert time.monotonic() - started < 10
    assert message == "sqlite:///course.db: query failed: stopped after 0.2 s (interrupted)"


@pytest.fixture
def query_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement run on a SQLite connection opened from now on (a trace callback
    on the real connections), to count how often the query runs."""
    statements: list[str] = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    return statements


def test_db_query_runs_once_however_often_the_source_is_read(
    course_db: Path, query_runs: list[str]
) -> None:
    source = open_db("sqlite:///course.db", JOIN)
    first, second = list(source), list(source)
    assert first == second and len(first) == 12
    assert [s for s in query_runs if "JOIN courses" in s] == [JOIN]


def test_db_multi_line_value_in_a_body_only_column(tmp_path: Path) -> None:
    with sqlite3.connect("notes.db") as conn:
        conn.execute("CREATE TABLE t (name TEXT, email TEXT, course TEXT, notes TEXT)")
        conn.executemany(
            "INSERT INTO t VALUES (?, ?, ?, ?)",
            [
                ("Ada", "ada@example.edu", "CS1", "Room 4\r\nBring the forms\nThanks"),
                ("Ben", "ben@example.edu", "CS1\nBcc: x@example.org", "fine"),
                ("Eve\nBcc: x@example.org", "eve@example.org", "CS1", "fine"),
            ],
        )
    conn.close()
    source = open_db("sqlite:///notes.db", "SELECT * FROM t")
    source.header_columns = frozenset({"course"})
    ada, ben, eve = source
    assert ada.skip_reason is None
    assert ada.fields["notes"] == "Room 4\r\nBring the forms\nThanks"
    assert ben.skip_reason == "column 'course' contains a line feed (LF)"
    assert eve.skip_reason == "column 'name' contains a line feed (LF)"


# --------------------------------------------------------------------------- PostgreSQL


def course_tables(url: str) -> None:
    """The example course database's two tables, in a PostgreSQL database."""
    import sqlalchemy as sa

    from examples.make_course_db import COURSES, INSTRUCTORS

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE instructors (id integer PRIMARY KEY, name text, email text)"
            )
            conn.exec_driver_sql(
                "CREATE TABLE courses (id integer PRIMARY KEY, code text, title text,"
                " instructor_id integer, starts_on text)"
            )
            conn.exec_driver_sql("CREATE SEQUENCE instructors_seq")
            conn.exec_driver_sql(
                "INSERT INTO instructors VALUES (%s, %s, %s)", [tuple(r) for r in INSTRUCTORS]
            )
            conn.exec_driver_sql(
                "INSERT INTO courses VALUES (%s, %s, %s, %s, %s)", [tuple(r) for r in COURSES]
            )
    finally:
        engine.dispose()


def table_contents(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, read on a new connection (what psql would show)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            names = [
                row[0]
                for row in conn.exec_driver_sql(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
                )
            ]
            return {
                name: [tuple(r) for r in conn.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY 1')]
                for name in names
            }
    finally:
        engine.dispose()


@pytest.fixture
def course_pg(pg_url: str) -> str:
    """A PostgreSQL database holding the example course tables."""
    course_tables(pg_url)
    return pg_url


def shown(url: str) -> str:
    """The URL as messages show it (no password)."""
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def assert_unchanged(url: str) -> None:
    """Nothing was written: the example's twelve rows in each table, as built."""
    tables = table_contents(url)
    assert len(tables["instructors"]) == 12 and len(tables["courses"]) == 12


def test_pg_query_values_and_characters_a_driver_could_misread(course_pg: str) -> None:
    query = (
        f"/* a comment */ {JOIN}"
        " WHERE i.email LIKE '%example.%' AND i.name <> ':x' AND i.name <> $$O'Brien$$"
        " ORDER BY c.code; -- done"
    )
    source = open_db(course_pg, query)
    assert source.columns == ["name", "email", "course", "title", "starts_on"]
    recipients = list(source)
    assert len(recipients) == 12
    assert recipients[0].fields["course"] == "BIO120"
    assert recipients[0].fields["starts_on"] == "2025-09-15"
    assert_unchanged(course_pg)


def test_pg_the_server_refuses_a_second_statement(course_pg: str) -> None:
    """Below the splitter: the query goes out as a prepared statement, which PostgreSQL
    refuses to hold two commands, so a COMMIT can never end the read-only transaction."""
    from sqlalchemy import make_url

    from bulkmail.sources import _read_only, _run

    hostile = "SELECT name, email FROM instructors; COMMIT; DELETE FROM instructors WHERE id = 2"
    with pytest.raises(InputError, match="cannot insert multiple commands"):  # noqa: SIM117
        with _read_only(make_url(course_pg), "db", 5.0) as conn:
            _run(conn, hostile, "db", 5.0)
    assert_unchanged(course_pg)


@pytest.mark.parametrize(
    "query",
    [
        "WITH gone AS (DELETE FROM instructors RETURNING name, email) SELECT * FROM gone",
        "SELECT name, email FROM instructors FOR UPDATE",
        "SELECT name, email, nextval('instructors_seq') FROM instructors",
    ],
)
def test_pg_a_writing_statement_fails_in_the_read_only_transaction(
    course_pg: str, query: str
) -> None:
    message = error(open_db, course_pg, query)
    assert message.startswith(f"{shown(course_pg)}: query failed: ")
    assert "read-only transaction" in message
    assert_unchanged(course_pg)


def test_pg_query_is_stopped_after_the_timeout(course_pg: str) -> None:
    started = time.monotonic()
    message = error(
        lambda: open_db(course_pg, "SELECT name, email FROM instructors, pg_sleep(60)", timeout=0.2)
    )
    assert time.monotonic() - started < 10
    assert message == (
        f"{shown(course_pg)}: query failed: stopped after 0.2 s"
        " (canceling statement due to statement timeout)"
    )


def test_pg_plain_url_uses_psycopg_3_and_other_drivers_are_refused(course_pg: str) -> None:
    plain = course_pg.replace("postgresql+psycopg://", "postgresql://")
    source = open_db(plain)
    assert source.description == shown(plain)
    assert len(list(source)) == 12
    psycopg2 = course_pg.replace("postgresql+psycopg://", "postgresql+psycopg2://")
    message = error(open_db, psycopg2)
    assert message == (
        f"{shown(psycopg2)}: the psycopg2 driver cannot keep a --query to one statement;"
        " use postgresql+psycopg:// (psycopg 3)"
    )


def test_pg_a_role_that_can_write_what_the_query_reads_is_named(course_pg: str) -> None:
    from sqlalchemy import make_url

    role = make_url(course_pg).username
    source = open_db(course_pg, JOIN)
    assert source.warnings == [
        f"{shown(course_pg)}: the role '{role}' can write to courses, instructors (which the"
        " query reads); connect --db as a role that may only SELECT (see the README,"
        " 'Course database')"
    ]
    assert open_db(course_pg, "SELECT 'a@example.edu' AS email").warnings == []


def readme_role_sql() -> str:
    """The read-only role the README recommends, exactly as it shows it."""
    text = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    found = re.search(r"```sql\n(CREATE ROLE bulkmail_reader .*?)```", text, re.DOTALL)
    assert found is not None, "the README shows no read-only role"
    return found.group(1)


@pytest.fixture
def reader_url(course_pg: str) -> Iterator[str]:
    """``course_pg`` reached as the README's read-only role (a unique name per test)."""
    import uuid

    import sqlalchemy as sa

    url = sa.make_url(course_pg)
    role, password = f"bulkmail_reader_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    sql = (
        readme_role_sql()
        .replace("bulkmail_reader", role)
        .replace("'choose-a-password'", f"'{password}'")
        .replace("DATABASE courses", f'DATABASE "{url.database}"')
    )
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in filter(str.strip, sql.split(";")):
                conn.exec_driver_sql(statement)
        yield url.set(username=role, password=password).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
    finally:
        admin.dispose()


def test_pg_the_readme_read_only_role_reads_and_is_not_warned_about(
    course_pg: str, reader_url: str
) -> None:
    import sqlalchemy as sa

    source = open_db(reader_url, JOIN)
    assert len(list(source)) == 12
    assert source.warnings == []
    # the role really cannot write, even outside bulkmail's read-only transaction
    engine = sa.create_engine(reader_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("SET default_transaction_read_only = off")
            conn.exec_driver_sql("DELETE FROM instructors")
    finally:
        engine.dispose()
    assert_unchanged(course_pg)
    # one privilege more, on one table: that table is named
    admin = sa.create_engine(course_pg, poolclass=sa.pool.NullPool)
    try:
        with admin.begin() as conn:
            role = sa.make_url(reader_url).username
            conn.exec_driver_sql(f"GRANT UPDATE ON instructors TO {role}")
    finally:
        admin.dispose()
    [warning] = open_db(reader_url, JOIN).warnings
    assert f"the role '{role}' can write to instructors (which the query reads)" in warning


# --------------------------------------------------------------------------- select


def people(*emails: str) -> list[Recipient]:
    return [Recipient(row=i, email=e, name="", fields={"email": e}) for i, e in enumerate(emails)]


def test_select_only_and_exclude() -> None:
    rows = people("Ada@example.edu", "ben@example.edu", "chen@example.org")
    assert list(select(rows, [], [])) == rows
    assert [r.email for r in select(rows, ["ada@EXAMPLE.edu", " CHEN@example.org "], [])] == [
        "Ada@example.edu",
        "chen@example.org",
    ]
    assert [r.email for r in select(rows, [], ["BEN@example.edu"])] == [
        "Ada@example.edu",
        "chen@example.org",
    ]
    assert [r.email for r in select(rows, ["ada@example.edu"], ["ada@example.edu"])] == []


def test_select_only_typo_is_an_error_at_the_end() -> None:
    rows = people("ada@example.edu", "ben@example.edu")
    selected = select(iter(rows), ["ada@example.edu", "bne@example.edu"], [])
    assert next(selected).email == "ada@example.edu"  # lazy
    with pytest.raises(InputError, match=r"^--only bne@example.edu: not in the recipients$"):
        list(selected)


def test_select_empty_address_is_an_error() -> None:
    assert error(select, people("a@example.edu"), [], [" "]) == "--exclude: empty address"


def test_select_on_a_real_source(course_db: Path) -> None:
    source = open_db("sqlite:///course.db")
    chosen = list(select(source, ["ZOE.ANGSTROM@example.edu"], []))
    assert [r.name for r in chosen] == ["Zoë Ångström"]


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-."


@given(
    local=st.text(alphabet=_ATEXT, min_size=0, max_size=70),
    domain=st.one_of(
        st.text(alphabet="abcXYZ019.-", min_size=0, max_size=30),
        st.sampled_from(["example.edu", "EXAMPLE.org", "localhost", "a..b", "-x.com", "x.c"]),
        st.text(max_size=12),
    ),
)
@settings(max_examples=300, deadline=None)
def test_plain_address_short_cut_agrees_with_email_validator(local: str, domain: str) -> None:
    """The cached-domain short cut for plain ASCII addresses gives exactly email-validator's
    answer: the same normalised address, or a refusal."""
    from email_validator import EmailNotValidError, validate_email

    from bulkmail.sources import _deliverable

    address = f"{local}@{domain}"
    try:
        info = validate_email(address, check_deliverability=False)
        expected: str | None = info.ascii_email or info.normalized
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = _deliverable(address)
    except EmailNotValidError:
        got = None
    assert got == expected
