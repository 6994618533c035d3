"""Templates, rendering, attachments and header safety (bulkmail.compose)."""

from __future__ import annotations

import email
import email.policy
import json
import os
from pathlib import Path

import pytest

from bulkmail.compose import MAX_ATTACHMENT_BYTES, Composer, Templates, header_safe_problem
from bulkmail.errors import InputError, file_error
from bulkmail.models import Attachment, Recipient

SENDER = "Course Office <office@example.edu>"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def person(row: int = 2, name: str = "Ada Lovelace", **fields: str) -> Recipient:
    return Recipient(row=row, email="ada@example.org", name=name, fields=dict(fields))


def composer(
    tmp_path: Path,
    text: str = "Hello {{ name }},\n",
    *,
    subject: str = "Reminder for {{ name }}",
    html: str | None = None,
    attach: tuple[str, ...] = (),
    sender: str = SENDER,
) -> Composer:
    text_path = write(tmp_path / "reminder.txt", text)
    html_path = None if html is None else write(tmp_path / "reminder.html", html)
    templates = Templates.load(
        subject=subject, text_path="reminder.txt", html_path=html_path and "reminder.html",
        attach=attach,
    )  # fmt: skip
    assert text_path.exists()
    return Composer(templates, sender=sender)


# --------------------------------------------------------------------------- Templates.load


def test_load_reads_the_files_and_makes_attachment_patterns_absolute(tmp_path: Path) -> None:
    write(tmp_path / "t" / "reminder.txt", "\ufeffHello {{ name }}\n")  # a BOM is dropped
    write(tmp_path / "t" / "reminder.html", "<p>Hello {{ name }}</p>\n")
    t = Templates.load(
        subject="Hi {{ name }}",
        text_path="t/reminder.txt",
        html_path=Path("t/reminder.html"),
        attach=["sheets/{{ course }}.pdf", "/srv/common.pdf"],
    )
    assert t.text == "Hello {{ name }}\n"
    assert t.html == "<p>Hello {{ name }}</p>\n"
    assert (t.text_name, t.html_name) == ("t/reminder.txt", "t/reminder.html")
    assert t.attachments == (str(tmp_path / "sheets") + "/{{ course }}.pdf", "/srv/common.pdf")


def test_load_missing_template_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^nope\.txt: no such file$"):
        Templates.load(subject="x", text_path="nope.txt")
    write(tmp_path / "ok.txt", "x")
    with pytest.raises(InputError, match=r"^nope\.html: no such file$"):
        Templates.load(subject="x", text_path="ok.txt", html_path="nope.html")


def test_load_rejects_a_directory_and_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(InputError, match=r"^dir\.txt: is a directory"):
        Templates.load(subject="x", text_path="dir.txt")
    write(tmp_path / "latin1.txt", "Hello\nRen\xe9e\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"^latin1\.txt: line 2: not UTF-8 \(byte 0xe9\)"):
        Templates.load(subject="x", text_path="latin1.txt")


def test_file_errors_read_the_same_for_every_input_file(tmp_path: Path) -> None:
    """Templates and CSV files (sources) share one mapping of open errors to messages."""
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(InputError, match=r"^dir\.txt: is a directory, expected a template file$"):
        Templates.load(subject="x", text_path="dir.txt")
    cases = [
        (FileNotFoundError(2, "No such file or directory"), "t.txt: no such file"),
        (PermissionError(13, "Permission denied"), "t.txt: cannot read (permission denied)"),
        (OSError(5, "Input/output error"), "t.txt: cannot read (Input/output error)"),
        (OSError("odd\nreason"), "t.txt: cannot read (odd\\nreason)"),
    ]
    for exc, message in cases:
        assert str(file_error("t.txt", exc, "a template file")) == message
    assert str(file_error("d.csv", IsADirectoryError(21, "x"), "a CSV file")) == (
        "d.csv: is a directory, expected a CSV file"
    )


def test_load_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "bad.txt", "Hello {{ name }},\n\nsee {{ course }\n")
    with pytest.raises(InputError, match=r"^bad\.txt: line 3: ") as info:
        Templates.load(subject="x", text_path="bad.txt")
    assert "\n" not in str(info.value)


def test_load_syntax_error_in_subject_and_attachment(tmp_path: Path) -> None:
    write(tmp_path / "ok.txt", "x")
    with pytest.raises(InputError, match=r"^--subject: "):
        Templates.load(subject="Hi {{ name", text_path="ok.txt")
    with pytest.raises(InputError, match=r"^--attach 'x/\{\{ course'"):
        Templates.load(subject="x", text_path="ok.txt", attach=["x/{{ course"])


# --------------------------------------------------------------------------- Composer


def test_sender_with_and_without_display_name(tmp_path: Path) -> None:
    c = composer(tmp_path, sender="Course Office <Office@Example.EDU>")
    assert (c.sender_name, c.sender_email, c.domain) == (
        "Course Office",
        "Office@example.edu",
        "example.edu",
    )
    c = composer(tmp_path, sender="office@example.edu")
    assert (c.sender_name, c.sender_email) == ("", "office@example.edu")


def test_local_sender_for_the_outbox(tmp_path: Path) -> None:
    c = composer(tmp_path, sender="bulkmail@localhost")
    assert (c.sender_email, c.domain) == ("bulkmail@localhost", "localhost")


@pytest.mark.parametrize(
    "sender", ["", "Course Office", "office@", "Office <office@exa mple.edu>", "a\r\nBcc: x@y.z"]
)
def test_bad_sender_names_from(tmp_path: Path, sender: str) -> None:
    with pytest.raises(InputError, match=r"^--from: "):
        composer(tmp_path, sender=sender)


def test_variables_lists_what_the_templates_need(tmp_path: Path) -> None:
    c = composer(
        tmp_path,
        "Hi {{ name }}, {% for i in range(2) %}{{ i }}{% endfor %} {{ course }}\n",
        subject="{{ course }} due {{ due }}",
        html="<p>{{ room }}</p>{% set x = 1 %}{{ x }}",
        attach=("sheets/{{ folder }}/x.pdf",),
    )
    assert c.variables == {"name", "course", "due", "room", "folder"}


def test_render_uses_fields_name_email_and_row(tmp_path: Path) -> None:
    c = composer(
        tmp_path, "{{ name }}|{{ email }}|{{ row }}|{{ course }}\n", subject="{{ course }}"
    )
    r = Recipient(row=7, email="ada@example.org", name="Ada", fields={"course": "CS101"})
    m = c.build(r, "<m@x>")
    assert m.text == "Ada|ada@example.org|7|CS101\n"  # trailing newline kept
    assert (m.subject, m.to_email, m.to_name, m.from_email, m.from_name, m.message_id) == (
        "CS101",
        "ada@example.org",
        "Ada",
        "office@example.edu",
        "Course Office",
        "<m@x>",
    )
    assert m.html is None and m.attachments == ()


def test_normalised_name_and_email_override_fields(tmp_path: Path) -> None:
    c = composer(tmp_path, "{{ name }} {{ email }}")
    r = Recipient(2, "ada@example.org", "Ada", {"name": "raw", "email": "ADA@EXAMPLE.ORG"})
    assert c.build(r, "<m@x>").text == "Ada ada@example.org"


def test_undefined_variable_names_origin_row_template_and_variable(tmp_path: Path) -> None:
    c = composer(tmp_path, "Hello {{ name }}, {{ course }}\n")
    with pytest.raises(InputError) as info:
        c.check(person(row=3), "people.csv")
    assert str(info.value) == (
        "people.csv: row 3: template reminder.txt uses undefined variable 'course'"
    )


def test_undefined_variable_in_subject_html_and_attachment(tmp_path: Path) -> None:
    c = composer(tmp_path, subject="Due {{ due }}")
    with pytest.raises(InputError, match=r"^p\.csv: row 2: --subject uses undefined .* 'due'$"):
        c.check(person(), "p.csv")
    c = composer(tmp_path, html="<p>{{ room.number }}</p>")
    with pytest.raises(
        InputError, match=r"^p\.csv: row 2: template reminder\.html uses undefined .* 'room'$"
    ):
        c.check(person(), "p.csv")
    c = composer(tmp_path, attach=("sheets/{{ course }}.pdf",))
    with pytest.raises(InputError, match=r"^p\.csv: row 2: --attach .* undefined .* 'course'$"):
        c.check(person(), "p.csv")


def test_runtime_template_error_is_an_input_error(tmp_path: Path) -> None:
    c = composer(tmp_path, "{{ count / 0 }}")
    with pytest.raises(InputError, match=r"^p\.csv: row 2: template reminder\.txt: "):
        c.check(person(count="1"), "p.csv")


def test_html_is_autoescaped_and_text_is_not(tmp_path: Path) -> None:
    c = composer(tmp_path, "Hi {{ name }}\n", html="<p>Hi {{ name }}</p>\n")
    m = c.build(person(name="<script>alert(1)</script>"), "<m@x>")
    assert m.text == "Hi <script>alert(1)</script>\n"
    assert m.html == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>\n"
    parsed = email.message_from_bytes(m.to_bytes(), policy=email.policy.default)
    html_part = parsed.get_body(("html",))
    assert html_part is not None
    assert "<script>" not in html_part.get_content()


def test_subject_rendering_a_line_break_is_an_error(tmp_path: Path) -> None:
    c = composer(tmp_path, subject="{{ course | replace('-', '\\n') }}")
    with pytest.raises(InputError, match=r"^p\.csv: row 4: subject contains a line feed"):
        c.check(person(row=4, course="CS-101"), "p.csv")
    c = composer(tmp_path, subject="{{ course }}")
    bcc = "=?UTF-8?Q?=0A?=Bcc: x@evil.example"
    with pytest.raises(InputError, match=r"row 2: subject has an encoded word"):
        c.check(person(course=bcc), "p.csv")


def test_unsafe_name_is_refused_even_if_the_source_let_it_through(tmp_path: Path) -> None:
    c = composer(tmp_path)
    with pytest.raises(InputError, match=r"^p\.csv: row 2: name contains a carriage return"):
        c.check(person(name="Ada\rBcc: x@y.z"), "p.csv")


def test_skipped_recipients_are_not_rendered(tmp_path: Path) -> None:
    c = composer(tmp_path, "{{ missing }}")
    skipped = Recipient(2, "bad", "", skip_reason="invalid address")
    c.check(skipped, "p.csv")  # nothing raised
    with pytest.raises(ValueError):
        c.build(skipped, "<m@x>")


# --------------------------------------------------------------------------- attachments


def test_attachment_pattern_is_rendered_per_recipient(tmp_path: Path) -> None:
    write(tmp_path / "sheets" / "CS101.pdf", b"%PDF-1.4 CS101")
    write(tmp_path / "sheets" / "CS102.weird", b"\x00\x01")
    c = composer(tmp_path, attach=("sheets/{{ course }}.pdf",))
    c.check(person(course="CS101"), "p.csv")
    m = c.build(person(course="CS101"), "<m@x>")
    assert m.attachments == (Attachment("CS101.pdf", "application/pdf", b"%PDF-1.4 CS101"),)
    with pytest.raises(InputError) as info:
        c.check(person(row=3, course="CS102"), "p.csv")
    assert str(info.value) == "p.csv: row 3: attachment 'sheets/CS102.pdf' not found"

    c = composer(tmp_path, attach=("sheets/{{ course }}.weird",))
    m = c.build(person(course="CS102"), "<m@x>")
    assert m.attachments[0].content_type == "application/octet-stream"
    assert m.attachments[0].filename == "CS102.weird"


def test_attachment_found_after_changing_directory(tmp_path: Path) -> None:
    write(tmp_path / "sheets" / "CS101.pdf", b"%PDF")
    c = composer(tmp_path, attach=("sheets/{{ course }}.pdf",))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the conftest fixture restores the directory
    assert c.build(person(course="CS101"), "<m@x>").attachments[0].data == b"%PDF"


def test_attachment_too_large_or_not_a_file(tmp_path: Path) -> None:
    big = write(tmp_path / "big.pdf", b"")
    os.truncate(big, MAX_ATTACHMENT_BYTES + 1)  # sparse: cheap
    c = composer(tmp_path, attach=("{{ f }}",))
    with pytest.raises(InputError, match=r"^p\.csv: row 2: attachment 'big\.pdf' is 10\.0 MB, ove"):
        c.check(person(f="big.pdf"), "p.csv")
    (tmp_path / "adir").mkdir()
    with pytest.raises(InputError, match=r"attachment 'adir' is not a regular file"):
        c.check(person(f="adir"), "p.csv")
    with pytest.raises(InputError, match=r"--attach '\{\{ f \}\}' renders no file name"):
        c.check(person(f=""), "p.csv")


def test_a_value_cannot_lead_an_attachment_out_of_its_folder(tmp_path: Path) -> None:
    """A hostile row must not attach an arbitrary file (an SSH key, a password file): the
    rendered path stays inside the folder the pattern's literal beginning names."""
    write(tmp_path / "secret.txt", b"private")
    write(tmp_path / "sheets" / "CS101.pdf", b"%PDF")
    write(tmp_path / "sheets" / "sub" / "x.pdf", b"%PDF")
    c = composer(tmp_path, attach=("sheets/{{ course }}",))
    assert c.build(person(course="CS101.pdf"), "<m@x>").attachments[0].data == b"%PDF"
    assert c.build(person(course="sub/x.pdf"), "<m@x>").attachments[0].filename == "x.pdf"
    assert c.build(person(course="sub/../CS101.pdf"), "<m@x>").attachments[0].data == b"%PDF"
    for value in ("../secret.txt", "sub/../../secret.txt", "/../secret.txt"):
        with pytest.raises(InputError) as info:
            c.check(person(row=5, course=value), "p.csv")
        assert str(info.value).startswith("p.csv: row 5: --attach 'sheets/{{ course }}' renders")
        assert "outside the folder 'sheets/'" in str(info.value)
    # a pattern that is all template: the current directory is the folder
    c = composer(tmp_path, attach=("{{ f }}",))
    with pytest.raises(InputError, match=r"outside the folder '\./'"):
        c.check(person(f="../x"), "p.csv")
    assert c.build(person(f="secret.txt"), "<m@x>").attachments[0].data == b"private"
    # a fixed path (no template syntax) is the operator's own choice, '..' included
    os.chdir(tmp_path / "sheets")
    c = composer(tmp_path / "sheets", attach=("../secret.txt",))
    assert c.build(person(), "<m@x>").attachments[0].data == b"private"


def test_attachments_total_limit_per_message(tmp_path: Path) -> None:
    for name in ("a.pdf", "b.pdf"):
        os.truncate(write(tmp_path / name, b""), MAX_ATTACHMENT_BYTES // 2 + 1)
    c = composer(tmp_path, attach=("a.pdf", "b.pdf"))
    with pytest.raises(InputError, match=r"^p\.csv: row 2: attachments total 10\.0 MB, over"):
        c.check(person(), "p.csv")


# --------------------------------------------------------------------------- JSON form and headers


def test_templates_round_trip_through_their_json_form(tmp_path: Path) -> None:
    """What a job records is enough to render its messages again on resume."""
    write(tmp_path / "a.pdf", b"%PDF")
    c = composer(tmp_path, html="<p>{{ name }}</p>\n", attach=("a.pdf",))
    data = json.loads(json.dumps(c.templates.to_json()))
    assert Templates.from_json(c.templates.subject, data) == c.templates
    assert data == {
        "text": "Hello {{ name }},\n",
        "html": "<p>{{ name }}</p>\n",
        "attachments": [str(tmp_path / "a.pdf")],
        "text_name": "reminder.txt",
        "reply_to": [],
        "cc": [],
        "bcc": [],
        "headers": [
            ["Auto-Submitted", "auto-generated"],
            ["X-Auto-Response-Suppress", "OOF, AutoReply"],
        ],
        "html_name": "reminder.html",
    }
    bare = Templates.from_json("Hi", {"text": "x"})  # a job recorded before the names were
    assert (bare.html, bare.attachments, bare.text_name, bare.html_name) == (
        None,
        (),
        "template",
        None,
    )


@pytest.mark.parametrize(
    "value",
    [
        "\r",
        "\n",
        "\x00",
        "Ada\r\nBcc: x@y.z",
        "trailing\n",
        "esc\x1b[31m",
        "line\u2028separator",
        "next\x85line",
        "=?UTF-8?Q?=0A?=",
        "Hi =?utf-8?q?a=0D=0ABcc:_x@y.z?= there",
        "=?utf-8?b?DQpCY2M6IHhAeS56?=",
        "=?utf-8?B?AA==?=",
        "tab\x0bvertical",
        "form\x0cfeed",
        "del\x7f",
        "para\u2029separator",
        "file\x1cseparator",
        "=?utf-8?b?Cg==?=",
        "=?ISO-8859-1?Q?a=85b?=",  # NEL once decoded as Latin-1
    ],
)
def test_header_safe_problem_flags_line_breaks(value: str) -> None:
    assert header_safe_problem(value) is not None


def test_sources_and_compose_share_one_definition() -> None:
    """One function decides what is unsafe in a header, so a row the source lets through is
    never one the composer refuses (which would fail the whole command)."""
    from bulkmail import headersafe, sources

    assert header_safe_problem is headersafe.header_safe_problem
    assert sources.header_safe_problem is headersafe.header_safe_problem  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Ada Lovelace",
        "Zoë Ångström",
        "Reminder:\tCS101",
        "=?utf-8?q?Zo=C3=AB?=",
        "50% =? off ?=",
        "=?x-unknown?q?a?=",
        "=?utf-8?b?!!!?=",
    ],
)
def test_header_safe_problem_accepts_benign_values(value: str) -> None:
    assert header_safe_problem(value) is None
