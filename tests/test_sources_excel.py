"""Excel workbooks, CSV encodings and delimiters: real files made in tmp_path (workbooks with
openpyxl), read through the library and through the CLI (a real outbox, a real SQLite store)."""

from __future__ import annotations

import datetime
import json
import sqlite3
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from typer.testing import CliRunner

from bulkmail.cli import app
from bulkmail.errors import InputError
from bulkmail.sources import is_xlsx, open_csv, open_xlsx


def workbook(path: str, sheets: dict[str, Sequence[Sequence[Any]]]) -> Path:
    """A workbook with these sheets, each a list of rows starting at row 1 (an empty row:
    ``()``)."""
    book = openpyxl.Workbook()
    first = True
    for title, rows in sheets.items():
        ws = book.active if first else book.create_sheet()
        assert ws is not None
        ws.title = title
        first = False
        for number, row in enumerate(rows, 1):
            for column, value in enumerate(row, 1):
                ws.cell(row=number, column=column, value=value)
    book.save(path)
    return Path(path)


PEOPLE: list[Sequence[object]] = [
    ("Name", "E-Mail", "Course", "Due Date", "Credits", "Room"),
    ("Ada Whitfield", "ada@example.edu", "CS101", datetime.date(2026, 5, 1), 12.0, 101),
    (),
    ("Ben Okafor", "ben@example.edu", "CS220", datetime.datetime(2026, 5, 2, 0, 0), 2.5, None),
    ("Zoë Ångström", "zoe@example.edu", "PHYS210", datetime.datetime(2026, 5, 3, 14, 30), 3, "B2"),
]


def error(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InputError) as info:
        result = call(*args, **kwargs)
        list(result)
    message = str(info.value)
    assert "\n" not in message
    return message


def bulkmail(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def job_count(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


# --------------------------------------------------------------------------- library


def test_a_sheet_is_read_with_rows_numbered_as_in_the_sheet() -> None:
    source = open_xlsx(workbook("people.xlsx", {"People": PEOPLE}))
    assert source.description == "people.xlsx"
    assert source.columns == ["name", "email", "Course", "Due Date", "Credits", "Room"]
    ada, ben, zoe = source
    assert [r.row for r in (ada, ben, zoe)] == [2, 4, 5]  # the empty row 3 is ignored
    assert (ada.name, ada.email, ada.fields["Due Date"], ada.fields["Credits"]) == (
        "Ada Whitfield",
        "ada@example.edu",
        "2026-05-01",
        "12",
    )
    assert ada.fields["Room"] == "101"
    assert (ben.fields["Due Date"], ben.fields["Credits"], ben.fields["Room"]) == (
        "2026-05-02",
        "2.5",
        "",
    )
    # a date with a time of day keeps it; a whole number is shown without '.0'
    assert (zoe.name, zoe.fields["Due Date"], zoe.fields["Credits"]) == (
        "Zoë Ångström",
        "2026-05-03 14:30",
        "3",
    )
    assert all(r.skip_reason is None for r in source)


def test_a_named_sheet_and_an_unknown_one() -> None:
    path = workbook(
        "book.xlsx",
        {"Notes": [("just", "notes")], "Spring": [("email", "course"), ("a@example.edu", "X")]},
    )
    [r] = open_xlsx(path, "Spring")
    assert (r.row, r.email, r.fields["course"]) == (2, "a@example.edu", "X")
    assert error(open_xlsx, path, "Fall") == (
        "--sheet: book.xlsx has no sheet 'Fall' (sheets: 'Notes', 'Spring')"
    )
    # the first sheet by default; the sheet is named when the workbook has several
    assert error(open_xlsx, path).startswith("book.xlsx (sheet 'Notes'): no 'email' column")


def test_leading_empty_rows_and_columns_beyond_the_header() -> None:
    rows: list[Sequence[object]] = [(), (), ("email", "name"), ("a@example.edu", "Ada", "aside")]
    [r] = open_xlsx(workbook("late.xlsx", {"S": rows}))
    assert (r.row, r.email, r.name, r.fields) == (
        4,
        "a@example.edu",
        "Ada",
        {"email": "a@example.edu", "name": "Ada"},
    )


def test_the_same_checks_as_a_csv() -> None:
    rows: list[Sequence[object]] = [
        ("email", "name"),
        ("not an address", "X"),
        ("a@example.edu", "A"),
        ("A@example.edu", "B"),
        ("b@example.edu", "Eve\nBcc: x@example.org"),
    ]
    reasons = [r.skip_reason for r in open_xlsx(workbook("checks.xlsx", {"S": rows}))]
    assert reasons[0] is not None and reasons[0].startswith("invalid address")
    assert reasons[1:] == [None, "duplicate of row 3", "column 'name' contains a line feed (LF)"]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], "e.xlsx: empty sheet, expected a header row"),
        ([("email", "name")], "e.xlsx: no data rows below the header"),
        ([("name", "course"), ("Ada", "X")], "e.xlsx: no 'email' column (found: name, course)"),
    ],
)
def test_empty_sheets_and_bad_headers(rows: list[Sequence[object]], expected: str) -> None:
    assert error(open_xlsx, workbook("e.xlsx", {"S": rows})).startswith(expected)


def test_a_workbook_given_as_a_csv_is_read_as_excel() -> None:
    path = workbook("people.csv", {"People": PEOPLE})  # named .csv, an Excel file inside
    assert is_xlsx(path)
    assert [r.email for r in open_csv(path)] == [
        "ada@example.edu",
        "ben@example.edu",
        "zoe@example.edu",
    ]
    assert not is_xlsx(Path("missing.xlsx"))


def test_damaged_and_other_binary_files_are_one_line() -> None:
    good = workbook("good.xlsx", {"S": PEOPLE})
    data = good.read_bytes()
    Path("cut.xlsx").write_bytes(data[: len(data) // 2])
    assert (
        error(open_xlsx, "cut.xlsx")
        == "cut.xlsx: not an Excel workbook (.xlsx) but a damaged ZIP archive"
    )
    # a sound archive whose sheet XML is broken
    with zipfile.ZipFile(good) as src, zipfile.ZipFile("broken.xlsx", "w") as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.startswith("xl/worksheets/"):
                content = content[: len(content) // 2]
            dst.writestr(item, content)
    assert error(open_xlsx, "broken.xlsx").startswith("broken.xlsx: cannot read the ")
    Path("old.xls").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    assert error(open_csv, "old.xls") == (
        "old.xls: an old-style Office file (.xls?), not a CSV file; save it as an Excel"
        " workbook (.xlsx) or as CSV UTF-8"
    )
    with zipfile.ZipFile("sheet.ods", "w") as ods:
        ods.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
    assert error(open_csv, "sheet.ods").startswith("sheet.ods: an OpenDocument file, not a CSV")
    Path("list.csv").write_text("email\na@example.edu\n", encoding="utf-8")
    assert error(open_xlsx, "list.csv") == (
        "list.csv: not an Excel workbook (.xlsx) but a text file (a CSV? use --csv PATH)"
    )
    assert error(open_xlsx, "nope.xlsx") == "nope.xlsx: no such file"


# --------------------------------------------------------------------------- encodings


def test_cp1252_with_encoding_and_the_hint_without() -> None:
    Path("win.csv").write_bytes(
        "Name;E-Mail;Kurs\nJosé Núñez;jose@example.edu;Öl €\n".encode("cp1252")
    )
    message = error(open_csv, "win.csv")
    assert message == (
        "win.csv: row 2: not valid UTF-8 (save the file as UTF-8, or name its encoding:"
        " --encoding cp1252 is what Excel on Windows writes)"
    )
    [r] = open_csv("win.csv", encoding="cp1252")
    assert (r.name, r.email, r.fields["Kurs"]) == ("José Núñez", "jose@example.edu", "Öl €")


def test_a_wrong_encoding_names_the_row_and_the_option() -> None:
    Path("mixed.csv").write_bytes(b"name,email\nA,a@example.edu\n\x81,b@example.edu\n")
    assert error(open_csv, "mixed.csv", encoding="cp1252") == (
        "mixed.csv: row 3: not valid cp1252 (check --encoding)"
    )


def test_utf16_tab_separated_as_excel_saves_unicode_text() -> None:
    text = (
        "Name\tE-Mail\tCourse\r\nZoë\tzoe@example.edu\tPHYS, 210\r\n\r\n"
        "Ada\tada@example.edu\tCS\r\n"
    )
    Path("unicode.txt").write_bytes(text.encode("utf-16"))  # with a BOM, as Excel writes it
    zoe, ada = open_csv("unicode.txt", encoding="utf-16")
    assert (zoe.row, zoe.name, zoe.fields["Course"]) == (2, "Zoë", "PHYS, 210")
    assert (ada.row, ada.email) == (4, "ada@example.edu")
    data = text.encode("utf-16")
    at = data.index("Ada".encode("utf-16-le"))
    Path("bad16.txt").write_bytes(data[:at] + b"\x00\xdc" + data[at:])  # a lone surrogate
    assert error(open_csv, "bad16.txt", encoding="utf-16") == (
        "bad16.txt: row 4: not valid utf-16 (check --encoding)"
    )


def test_an_explicit_utf8_still_drops_the_bom() -> None:
    Path("bom.csv").write_bytes("\ufeffemail,name\nz@example.edu,Zoë\n".encode())
    assert open_csv("bom.csv", encoding="utf-8").columns == ["email", "name"]


@pytest.mark.parametrize("name", ["klingon", "base64", ""])
def test_an_unknown_encoding_names_the_option(name: str) -> None:
    Path("x.csv").write_text("email\na@example.edu\n", encoding="utf-8")
    assert error(open_csv, "x.csv", encoding=name).startswith(
        f"--encoding: unknown encoding '{name}'"
    )


# --------------------------------------------------------------------------- delimiters


@pytest.mark.parametrize(
    ("text", "course"),
    [
        ("name\temail\tcourse\nAda\ta@example.edu\tCS, 1\n", "CS, 1"),
        ("name|email|course\nAda|a@example.edu|CS; 1\n", "CS; 1"),
        ('"name;x"|email|course\nAda|a@example.edu|CS\n', "CS"),  # quoted ';' do not count
        ("email,course;x\na@example.edu,CS;1\n", "CS;1"),  # ',' wins a tie
    ],
)
def test_tab_and_pipe_delimiters(text: str, course: str) -> None:
    Path("d.csv").write_text(text, encoding="utf-8")
    [r] = open_csv("d.csv")
    assert r.email == "a@example.edu"
    assert list(r.fields.values())[-1] == course


# --------------------------------------------------------------------------- CLI


def send(*args: str) -> Any:
    Path("t.txt").write_text(
        "Dear {{ name }}, grades for {{ course }} are due on {{ due_date }}.\n", encoding="utf-8"
    )
    return bulkmail(
        "send-reminders",
        "--yes",
        *args,
        "--template",
        "t.txt",
        "--subject",
        "Reminder: {{ Course }}",
        "--store",
        "jobs.db",
    )


def test_cli_sends_from_an_excel_sheet_with_a_due_date_column(isolated_env: Path) -> None:
    workbook("people.xlsx", {"Notes": [("x",)], "People": PEOPLE})
    result = send("--xlsx", "people.xlsx", "--sheet", "People", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["sent"], doc["skipped"]) == (3, 0)
    outbox = isolated_env / ".local" / "share" / "bulkmail" / "outbox"
    bodies = sorted(p.read_bytes().decode() for p in outbox.glob("*.eml"))
    assert any("grades for CS101 are due on 2026-05-01." in b for b in bodies)
    assert any("Subject: Reminder: PHYS210" in b for b in bodies)


def test_cli_dry_run_of_a_workbook_passed_to_csv(isolated_env: Path) -> None:
    workbook("people.csv", {"People": PEOPLE})
    result = send("--csv", "people.csv", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["source"], doc["pending"], doc["empty_values"]) == ("people.csv", 3, {})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--xlsx", "people.xlsx", "--sheet", "Fall"], "--sheet: people.xlsx has no sheet 'Fall'"),
        (["--xlsx", "cut.xlsx"], "cut.xlsx: not an Excel workbook (.xlsx) but a damaged ZIP"),
        (["--csv", "list.csv", "--sheet", "People"], "--sheet needs --xlsx PATH"),
        (["--xlsx", "people.xlsx", "--encoding", "cp1252"], "--encoding is for a CSV file"),
        (["--csv", "people.xlsx", "--encoding", "cp1252"], "--encoding: people.xlsx is an Excel"),
        (["--csv", "list.csv", "--encoding", "klingon"], "--encoding: unknown encoding 'klingon'"),
        (["--csv", "list.csv", "--xlsx", "people.xlsx"], "give exactly one recipient source"),
        (["--csv", "win.csv"], "win.csv: row 2: not valid UTF-8 (save the file as UTF-8, or"),
    ],
)
def test_cli_bad_sources_are_one_line_exit_2_and_no_job(args: list[str], expected: str) -> None:
    workbook("people.xlsx", {"People": PEOPLE})
    Path("cut.xlsx").write_bytes(Path("people.xlsx").read_bytes()[:300])
    Path("list.csv").write_text(
        "name,email,course,due_date\nA,a@example.edu,X,Y\n", encoding="utf-8"
    )
    Path("win.csv").write_bytes(
        "name,email,course,due_date\nJosé,j@example.edu,X,Y\n".encode("cp1252")
    )
    result = send(*args, "--yes")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"bulkmail: {expected}"), line
    assert job_count(Path("jobs.db")) == 0


def test_cli_encoding_reads_a_windows_csv() -> None:
    Path("win.csv").write_bytes(
        "name;email;Course;due_date\nJosé;j@example.edu;Öl;Mo\n".encode("cp1252")
    )
    result = send("--csv", "win.csv", "--encoding", "cp1252", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 1
