"""Column names that are not identifiers, unknown variables with a suggestion, and empty values
(--on-empty): the composer on real template files, the CLI on real CSVs, outbox and store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bulkmail.cli import app
from bulkmail.compose import Composer, Templates, identifier, template_names
from bulkmail.errors import InputError
from bulkmail.models import Recipient


def composer(
    text: str = "Hi {{ name }}\n",
    *,
    subject: str = "Reminder",
    html: str | None = None,
    attach: tuple[str, ...] = (),
) -> Composer:
    Path("reminder.txt").write_text(text, encoding="utf-8")
    if html is not None:
        Path("reminder.html").write_text(html, encoding="utf-8")
    templates = Templates.load(
        subject=subject,
        text_path="reminder.txt",
        html_path="reminder.html" if html is not None else None,
        attach=attach,
    )
    return Composer(templates, sender="Office <office@example.edu>")


def unknown(c: Composer, columns: list[str]) -> str:
    with pytest.raises(InputError) as info:
        c.check_columns(columns, "p.csv")
    return str(info.value)


COLUMNS = ["name", "email", "Course", "Due Date", "2nd Reader"]


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("Due Date", "due_date"),
        ("  Due -- Date (UTC) ", "due_date_utc"),
        ("Course", "course"),
        ("2nd Reader", "_2nd_reader"),
        ("Straße", "strasse"),
        ("room_no", "room_no"),
        ("???", ""),
    ],
)
def test_identifier(column: str, expected: str) -> None:
    assert identifier(column) == expected


def test_snake_case_names_and_the_columns_mapping_render() -> None:
    c = composer(
        "{{ due_date }}|{{ columns['Due Date'] }}|{{ _2nd_reader }}|{{ course }}|{{ row }}\n",
        subject="{{ Course }} due {{ due_date }}",
    )
    assert c.check_columns(COLUMNS, "p.csv") == []
    fields = {"name": "Ada", "email": "a@example.edu", "Course": "CS1", "Due Date": "May 1"}
    fields["2nd Reader"] = "Ben"
    m = c.build(Recipient(4, "a@example.edu", "Ada", fields), "<m@x>")
    assert (m.subject, m.text) == ("CS1 due May 1", "May 1|May 1|Ben|CS1|4\n")
    # the subject reads 'Due Date' through its snake_case name: a header column
    assert c.header_columns(COLUMNS) == {"Course", "Due Date"}


def test_a_column_named_row_or_columns_does_not_replace_the_built_ins() -> None:
    names = template_names(("email", "Row", "Columns"))
    assert names.aliases == {}
    assert set(names.clashes) == {"row", "columns"}
    c = composer("{{ row }} {{ columns['Row'] }}\n")
    [warning] = c.check_columns(["email", "Row"], "p.csv")
    assert warning == (
        "p.csv: template uses 'row' (text template reminder.txt, line 1), which is the row"
        " number, not 'Row'; write columns['Row'] for that column"
    )
    r = Recipient(2, "a@example.edu", "", {"email": "a@example.edu", "Row": "B7"})
    assert c.build(r, "<m@x>").text == "2 B7\n"


def test_two_headers_with_one_snake_case_name_warn_only_when_used() -> None:
    columns = ["email", "Due Date", "due-date"]
    assert composer("{{ columns['due-date'] }}\n").check_columns(columns, "p.csv") == []
    [warning] = composer("x\n", subject="{{ due_date }}").check_columns(columns, "p.csv")
    assert warning == (
        "p.csv: template uses 'due_date' (subject), which is the column 'Due Date', not"
        " 'due-date'; write columns['due-date'] for that column"
    )


def test_unknown_variable_in_the_subject_suggests_the_closest() -> None:
    message = unknown(composer(subject="Hi {{ nmae }}"), COLUMNS)
    assert message == "p.csv: template uses 'nmae' (subject): did you mean 'name'?"


def test_unknown_variables_name_the_template_and_the_line() -> None:
    c = composer(
        "Dear {{ name }},\n\nyour {{ corse }} grades\n",
        html="<p>\n{{ duedate }}</p>",
        attach=("sheets/{{ signature }}.pdf",),
    )
    assert unknown(c, COLUMNS) == (
        "p.csv: template uses 'corse' (text template reminder.txt, line 3): did you mean"
        " 'course'?; template uses 'duedate' (HTML template reminder.html, line 2): did you"
        " mean 'due_date'?; template uses 'signature' (attachment path"
        " 'sheets/{{ signature }}.pdf')"
        " (the source has no such column; columns: name, email, Course (course),"
        " Due Date (due_date), 2nd Reader (_2nd_reader))"
    )


def test_unknown_key_of_the_columns_mapping() -> None:
    message = unknown(composer("{{ columns['Due date'] }}\n"), COLUMNS)
    assert message == (
        "p.csv: template uses \"columns['Due date']\" (text template reminder.txt, line 1):"
        " did you mean \"columns['Due Date']\"?"
    )


def test_loop_and_set_variables_are_not_columns() -> None:
    c = composer("{% set x = 1 %}{{ x }}{% for k, v in columns.items() %}{{ k }}{% endfor %}\n")
    assert c.check_columns(["email"], "p.csv") == []


def test_printed_columns_leave_out_tested_defaulted_and_built_in_values() -> None:
    c = composer(
        "{{ name }} {{ course }} {% if room %}in {{ room }}{% endif %}"
        " {{ note | default('-') }} {{ 'x' if due_date else 'y' }} {{ email }} {{ row }}"
        " {% if columns['Due Date'] %}{{ columns['Due Date'] }}{% endif %}\n",
        subject="{{ course }}",
        html="<p>{{ columns['Due Date'] }}</p>",
    )
    columns = ["name", "email", "course", "room", "note", "Due Date"]
    assert c.printed_columns(columns) == {
        "course": ("course", ("subject", "text template")),
        "name": ("name", ("text template",)),
        "Due Date": ("columns['Due Date']", ("HTML template",)),
    }
    # without a name column, 'name' is the recipient's (empty) name: not a column to check
    assert "name" not in c.printed_columns(["email", "course"])


# --------------------------------------------------------------------------- CLI


def bulkmail(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


LIST = (
    "Name,E-Mail,Course,Due Date\n"
    "Ada,ada@example.edu,CS101,2026-05-01\n"
    "Ben,ben@example.edu,,2026-05-02\n"
    "Chen,chen@example.edu,PHYS210,\n"
    "Dee,dee@example.edu,,\n"
)


def send(*args: str, subject: str = "Grades due {{ due_date }}", text: str = "") -> Any:
    Path("list.csv").write_text(LIST, encoding="utf-8")
    Path("t.txt").write_text(
        text or "Dear {{ name }}, the final grades for {{ course }} are due.\n", encoding="utf-8"
    )
    return bulkmail(
        "send-reminders",
        "--yes",
        "--csv",
        "list.csv",
        "--template",
        "t.txt",
        "--subject",
        subject,
        "--store",
        "jobs.db",
        *args,
    )


SUBJECT_EMPTY = "empty 'due_date' (used by the subject)"


def test_dry_run_counts_empty_values_and_refuses_an_empty_subject_value() -> None:
    result = send("--dry-run", "--json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["empty_values"] == {"course": 2, "due_date": 2}
    assert [(s["row"], s["reason"]) for s in doc["skips"]] == [
        (3, "empty 'course' (used by the text template)")
    ]
    assert [(r["row"], r["error"]) for r in doc["refused"]] == [
        (
            row,
            f"list.csv: row {row}: {SUBJECT_EMPTY}; fill it in, or pass --on-empty skip (or send)",
        )
        for row in (4, 5)
    ]
    assert result.stderr == (
        "bulkmail: list.csv: row 4: empty 'due_date' (used by the subject); fill it in, or"
        " pass --on-empty skip (or send) (and 1 more rows)\n"
    )
    assert not Path("jobs.db").exists()


def test_default_skips_rows_whose_body_value_is_empty_with_the_reason(
    isolated_env: Path,
) -> None:
    result = send("--yes", "--json", subject="Grades for {{ name }}")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["sent"], doc["skipped"]) == (2, 2)
    with sqlite3.connect("jobs.db") as conn:
        reasons = conn.execute(
            "SELECT email, last_error FROM deliveries WHERE state = 'skipped' ORDER BY position"
        ).fetchall()
    assert [tuple(r) for r in reasons] == [
        ("ben@example.edu", "empty 'course' (used by the text template)"),
        ("dee@example.edu", "empty 'course' (used by the text template)"),
    ]
    outbox = isolated_env / ".local" / "share" / "bulkmail" / "outbox"
    assert not any(b"grades for  are due" in p.read_bytes() for p in outbox.glob("*.eml"))


def test_on_empty_fail_send_and_a_bad_value() -> None:
    failed = send("--yes", "--on-empty", "fail", subject="x")
    assert failed.exit_code == 2
    assert failed.stderr == (
        "bulkmail: list.csv: row 3: empty 'course' (used by the text template); fill it in,"
        " or pass --on-empty skip (or send)\n"
    )
    with sqlite3.connect("jobs.db") as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    sent = send("--dry-run", "--json", "--on-empty", "send")
    assert sent.exit_code == 0, sent.stderr
    doc = json.loads(sent.stdout)
    assert (doc["pending"], doc["skips"], doc["empty_values"]) == (
        4,
        [],
        {"course": 2, "due_date": 2},
    )
    skipped = send("--dry-run", "--json", "--on-empty", "skip")
    assert json.loads(skipped.stdout)["pending"] == 1
    bad = send("--dry-run", "--on-empty", "maybe")
    assert bad.exit_code == 2
    assert bad.stderr == "bulkmail: --on-empty: must be skip, fail or send, got 'maybe'\n"


def test_an_empty_rendered_body_or_subject_is_never_sent() -> None:
    body = send("--dry-run", "--json", "--on-empty", "send", subject="x", text="{{ course }}")
    assert body.exit_code == 0, body.stderr
    doc = json.loads(body.stdout)
    assert [(s["row"], s["reason"]) for s in doc["skips"]] == [
        (3, "the text body renders empty"),
        (5, "the text body renders empty"),
    ]
    subject = send("--yes", subject="{{ 'x' if name == 'Ada' }}", text="Hi\n")
    assert subject.exit_code == 2
    assert subject.stderr == (
        "bulkmail: list.csv: row 3: the subject renders empty; nothing sent (or pass"
        " --on-empty skip)\n"
    )


def test_preview_and_the_prompt_line_know_about_empty_values() -> None:
    Path("list.csv").write_text(LIST, encoding="utf-8")
    Path("t.txt").write_text("{{ course }} due {{ columns['Due Date'] }}\n", encoding="utf-8")
    result = bulkmail(
        "preview", "--csv", "list.csv", "--template", "t.txt", "--subject", "{{ nme }}"
    )
    assert result.exit_code == 2
    assert (
        result.stderr == "bulkmail: list.csv: template uses 'nme' (subject): did you mean 'name'?\n"
    )
    result = bulkmail(
        "preview", "--csv", "list.csv", "--template", "t.txt", "--subject", "Hi", "--count", "5"
    )
    assert result.exit_code == 0, result.stderr
    assert "CS101 due 2026-05-01" in result.stdout
    assert "PHYS210" not in result.stdout  # row 4 leaves 'Due Date' empty: skipped
    assert "--on-empty" in bulkmail("send-reminders", "--help").stdout
