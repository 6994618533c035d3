"""Hostile recipient lists, read back at a real SMTP server: header injection through names,
addresses and subject variables (raw CR/LF, Unicode line separators, other controls, RFC 2047
encoded words that decode to a line break), invalid and duplicate addresses, NUL. Nothing
may be injected: every message reaches exactly its one recipient with the headers bulkmail
wrote, and every bad row is a visible ``skipped`` delivery with its reason.

Then a property at the library level: any CSV row becomes either a well-formed message that
parses back to the same recipient, or a skipped delivery with a reason; nothing raises."""

from __future__ import annotations

import csv
import email
import email.header
import email.policy
import io
import json
import re
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bulkmail.compose import Composer, Templates
from bulkmail.mime import to_bytes_fast
from bulkmail.sources import open_csv, open_db
from bulkmail.store import message_id
from tests.e2e import WIDE, bulkmail, smtp_args, smtp_env
from tests.smtp_sink import SmtpSink
from tests.test_sources import course_tables, table_contents

VICTIM = "victim@example.org"
INJECT = f"\r\nBcc: {VICTIM}"
# base64 of "\r\nBcc: victim@example.org"
B64_INJECT = "=?utf-8?b?DQpCY2M6IHZpY3RpbUBleGFtcGxlLm9yZw==?="

# (name, email, course) -> what must happen: None = sent, else a fragment of the skip reason
ROWS: list[tuple[str, str, str, str | None]] = [
    ("Ada Lovelace", "ada@example.edu", "CS101", None),
    (f"Eve{INJECT}", "eve1@example.org", "CS101", "column 'name' contains a carriage return"),
    ("Eve\nBcc: victim@example.org", "eve2@example.org", "CS101", "contains a line feed (LF)"),
    (f"Eve\u2028Bcc: {VICTIM}", "eve3@example.org", "CS101", "a line separator (U+2028)"),
    (f"Eve\x85Bcc: {VICTIM}", "eve4@example.org", "CS101", "a line separator (U+0085)"),
    ("Eve\x0bVT", "eve5@example.org", "CS101", "a line separator (U+000B)"),
    ("Eve\x0cFF", "eve6@example.org", "CS101", "a line separator (U+000C)"),
    ("Eve\x7fDEL", "eve7@example.org", "CS101", "a control character (U+007F)"),
    ("Eve\x1b[2J", "eve8@example.org", "CS101", "a control character (U+001B)"),
    ("Eve\x00NUL", "eve9@example.org", "CS101", "a NUL character"),
    ("=?UTF-8?Q?=0A?=Bcc: victim@example.org", "eve10@example.org", "CS101", "encoded word"),
    (B64_INJECT, "eve11@example.org", "CS101", "encoded word"),
    ("Mallory", f"mallory1@example.org{INJECT}", "CS101", "column 'email' contains a carriage"),
    ("Mallory", f"mallory2@example.org, {VICTIM}", "CS101", "invalid address"),
    ("Mallory", f"mallory3@example.org>, <{VICTIM}", "CS101", "invalid address"),
    ("Mallory", "=?utf-8?q?=0D=0A?=@example.org", "CS101", "column 'email' has an encoded word"),
    ("Mallory", "not-an-address", "CS101", "invalid address"),
    ("Course", "course1@example.org", f"CS1{INJECT}", "column 'course' contains a carriage"),
    ("Course", "course2@example.org", f"=?UTF-8?Q?=0A?=Bcc: {VICTIM}", "column 'course' has"),
    ("Course", "course3@example.org", f"CS1\u2029Bcc: {VICTIM}", "a line separator (U+2029)"),
    ("Ada twin", "ADA@EXAMPLE.EDU", "CS101", "duplicate of row 2"),
    # benign but awkward: these are sent, quoted or encoded, each to its one recipient
    (f"Ann <{VICTIM}>", "ann@example.org", "CS101", None),
    ('Doe, "Jane"; Bcc:', "jane@example.org", "CS1 Bcc: x", None),
    ("Zoë Ångström", "zoe@example.edu", "PHYS\t210", None),
    ("Tab\tName", "tab@example.org", "=?utf-8?q?Zo=C3=AB?=", None),
    ("Ida", "ida@Bücher.example", "CS101", None),  # sent to the ASCII form of the domain
]

SENT = {"ada@example.edu", "ann@example.org", "jane@example.org", "zoe@example.edu"}
SENT |= {"tab@example.org", "ida@xn--bcher-kva.example"}
HEADERS = {"From", "To", "Subject", "Message-ID", "Date", "MIME-Version", "Content-Type"}
HEADERS |= {"Content-Transfer-Encoding"}
HEADERS |= {"Auto-Submitted", "X-Auto-Response-Suppress"}  # on every message (issue 14)


def write_rows(path: str, rows: list[tuple[str, str, str, str | None]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "email", "course"])
    writer.writerows(row[:3] for row in rows)
    Path(path).write_text(buffer.getvalue(), encoding="utf-8", newline="")


def check_nothing_injected(sink: SmtpSink) -> dict[str, EmailMessage]:
    by_to: dict[str, EmailMessage] = {}
    for received in sink.messages:
        message = received.parse()
        assert set(message.keys()) <= HEADERS, message.keys()
        assert all(len(message.get_all(key) or []) == 1 for key in message)
        [to] = message["To"].addresses
        assert received.rcpt_tos == [to.addr_spec]
        assert message.defects == [] and message["To"].defects == ()
        by_to[to.addr_spec] = message
    assert VICTIM not in {r for m in sink.messages for r in m.rcpt_tos}
    assert b"\nBcc" not in b"".join(m.data for m in sink.messages)
    return by_to


def test_hostile_csv_injects_nothing_and_every_bad_row_is_skipped_visibly(
    smtp_sink: SmtpSink,
) -> None:
    write_rows("hostile.csv", ROWS)
    Path("t.txt").write_text("Dear {{ name }}, about {{ course }}.\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--yes", "--csv", "hostile.csv", "--template", "t.txt",
        "--subject", "Reminder: {{ course }} for {{ name }}", *smtp_args(), "--json",
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"], doc["skipped"], doc["failed"]) == (
        "completed",
        len(SENT),
        len(ROWS) - len(SENT),
        0,
    )
    by_to = check_nothing_injected(smtp_sink)
    assert set(by_to) == SENT
    ann = by_to["ann@example.org"]
    assert ann["To"].addresses[0].display_name == f"Ann <{VICTIM}>"
    jane = by_to["jane@example.org"]
    assert jane["To"].addresses[0].display_name == 'Doe, "Jane"; Bcc:'
    assert jane["Subject"] == 'Reminder: CS1 Bcc: x for Doe, "Jane"; Bcc:'
    # an encoded word that decodes to harmless text is passed on, and a reader decodes it as
    # it would any header (a names column copied from raw mail headers then reads right)
    assert by_to["tab@example.org"]["Subject"] == "Reminder: Zoë for Tab\tName"

    # every skipped row, with its reason, in `status --skipped` and in the report
    status = bulkmail("status", "1", "--skipped", env=WIDE)
    assert status.exit_code == 0, status.output
    assert "\x1b[2J" not in status.stdout and "\x00" not in status.stdout
    skips = json.loads(bulkmail("status", "1", "--skipped", "--json").stdout)["skips"]
    report = list(csv.DictReader(io.StringIO(bulkmail("report", "1").stdout)))
    assert len(report) == len(ROWS)
    # deliveries keep the source order (row numbers are the lines where records start)
    for (*_, why), line in zip(ROWS, report, strict=True):
        assert line["state"] == ("sent" if why is None else "skipped"), line
        if why is not None:
            assert why in line["error"], line
    expected = [why for *_, why in ROWS if why is not None]
    assert len(skips) == len(expected)
    flat = " ".join(status.stdout.split())
    for skip, why in zip(skips, expected, strict=True):
        assert why in skip["reason"], skip
        assert skip["reason"].isprintable()
        assert " ".join(skip["reason"].split()) in flat or why in flat
        assert str(skip["row"]) in flat


def test_hostile_values_from_the_course_database_are_skipped_too(
    smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    import sqlite3

    conn = sqlite3.connect("hostile.db")
    with conn:
        conn.execute("CREATE TABLE instructors (name TEXT, email TEXT, course TEXT)")
        conn.executemany("INSERT INTO instructors VALUES (?, ?, ?)", [r[:3] for r in ROWS])
    conn.close()
    Path("t.txt").write_text("Dear {{ name }}, about {{ course }}.\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--yes", "--db", "sqlite:///hostile.db", "--template", "t.txt",
        "--query", "SELECT name, email, course FROM instructors",
        "--subject", "Reminder: {{ course }} for {{ name }}", *smtp_args(), "--json",
        env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == len(SENT)
    assert set(check_nothing_injected(smtp_sink)) == SENT


def test_dry_run_and_preview_of_a_hostile_list_escape_what_they_show() -> None:
    write_rows("hostile.csv", ROWS)
    Path("t.txt").write_text("Dear {{ name }}\n", encoding="utf-8")
    args = ["--csv", "hostile.csv", "--template", "t.txt", "--subject", "Hi {{ course }}"]
    dry = bulkmail("send-reminders", "--yes", *args, "--dry-run", env=WIDE)
    assert dry.exit_code == 0, dry.output
    assert f"{len(SENT)} to send, {len(ROWS) - len(SENT)} skipped" in dry.stdout
    for raw in ("\x1b", "\x00", "\x85", "\u2028", "\x0b", "\x0c", "\x7f"):
        assert raw not in dry.stdout, repr(raw)
    assert "mallory1@example.org\\r\\nBcc" in dry.stdout  # shown escaped, not executed
    preview = bulkmail("preview", *args, "--count", "10", env=WIDE)
    assert preview.exit_code == 0, preview.output
    assert preview.stdout.count("To:") == len(SENT)
    assert "eve" not in preview.stdout and "mallory" not in preview.stdout


# --------------------------------------------------------------------------- property


HOSTILE_TEXT = st.sampled_from(
    [
        INJECT,
        "\r",
        "\n",
        "\x00",
        "\u2028",
        "\x85",
        "\x0b",
        "\x1b",
        "\t",
        "=?UTF-8?Q?=0A?=",
        B64_INJECT,
        "=?utf-8?q?Zo=C3=AB?=",
        '"',
        "\\",
        "<",
        ">",
        ",",
        ";",
        ":",
        "@",
        "  ",
        "Zoë",
        "\u202e",
    ]
)
NAME = st.lists(st.one_of(st.text(max_size=8), HOSTILE_TEXT), max_size=4).map("".join)
ADDRESS = st.one_of(
    st.emails(),
    st.sampled_from(["ada@example.edu", "ADA@Example.EDU", "zoë@example.org", "x@@y", ""]),
    st.tuples(st.emails(), HOSTILE_TEXT).map("".join),
)


def parse(data: bytes, *, utf8: bool = False) -> EmailMessage:
    """As a mail client reads it; ``utf8``: an SMTPUTF8 message, UTF-8 headers (RFC 6532)."""
    data = data.replace(b"\r\n", b"\n")
    policy = email.policy.default
    if utf8:
        parsed = email.message_from_string(data.decode("utf-8"), policy=policy)
    else:
        parsed = email.message_from_bytes(data, policy=policy)
    assert isinstance(parsed, EmailMessage)
    return parsed


_ENCODED_PHRASE = re.compile(r"(=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=\s*)+")


def _display_name(data: bytes, parsed: str) -> str:
    """The To header's display name as RFC 2047 reads it. A long name is folded into
    several encoded words, and a reader ignores the white space between two adjacent ones
    (section 6.2); Python 3.11's address parser keeps it (a name split inside a word gains
    a space), so a name made only of encoded words is decoded here with the email.header
    functions, which follow the RFC."""
    raw = email.message_from_bytes(data, policy=email.policy.compat32)["To"]
    phrase = re.sub(r"\r?\n[ \t]", " ", str(raw)).rpartition(" <")[0]
    if not phrase or not _ENCODED_PHRASE.fullmatch(phrase):
        return parsed
    return str(email.header.make_header(email.header.decode_header(phrase)))


@pytest.fixture(scope="module")
def composer(tmp_path_factory: pytest.TempPathFactory) -> Composer:
    folder = tmp_path_factory.mktemp("templates")
    (folder / "t.txt").write_text("Dear {{ name }}, about {{ course }}.\n", encoding="utf-8")
    (folder / "t.html").write_text("<p>{{ name }}: {{ course }}</p>\n", encoding="utf-8")
    templates = Templates.load(
        subject="Reminder: {{ course }} for {{ name }}",
        text_path=folder / "t.txt",
        html_path=folder / "t.html",
    )
    return Composer(templates, sender="Course Office <office@example.edu>")


def _message_id(n: int) -> str:
    return message_id(1, n, "0a1b2c3d", "example.edu")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(NAME, ADDRESS, NAME), min_size=1, max_size=5))
# a long name folded inside a word into two encoded words (found by hypothesis)
@example([("P,G\U00018cd6\x91000\xa7\xe1\xfe\U000512f8\U000e9bf1\x80\x80" + "\U00010000" * 4,
           "0@A.COM", "")])  # fmt: skip
def test_any_row_is_a_well_formed_message_or_skipped_with_a_reason(
    composer: Composer, rows: list[tuple[str, str, str]]
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "email", "course"])
    writer.writerows(rows)
    Path("prop.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    try:
        source = open_csv("prop.csv")
    except Exception as exc:  # only a file-level refusal, e.g. every row blank
        assert "no data rows" in str(exc)
        return
    for n, recipient in enumerate(source, 1):
        if recipient.skip_reason is not None:
            assert recipient.skip_reason.strip() and recipient.skip_reason.isprintable()
            continue
        composer.check(recipient, "prop.csv")
        message = composer.build(recipient, _message_id(n))
        ascii_address = recipient.email.isascii()
        # what smtp and outbox send; EmailMessage's own bytes too when they are valid
        for data in (to_bytes_fast(message), *([message.to_bytes()] if ascii_address else [])):
            assert not any(len(line) > 998 for line in data.split(b"\r\n"))
            parsed = parse(data, utf8=not ascii_address)
            assert set(parsed.keys()) <= HEADERS
            assert all(len(parsed.get_all(key) or []) == 1 for key in parsed)
            [to] = parsed["To"].addresses
            assert to.addr_spec == recipient.email
            if ascii_address:
                assert parsed["To"].defects == ()
            if "=?" not in recipient.name:  # a benign encoded word is decoded by the reader
                # folding may turn a tab into a space: the same name to a reader
                assert _display_name(data, to.display_name).split() == recipient.name.split()
            if "=?" not in message.subject:
                assert parsed["Subject"].split() == message.subject.split()
            assert parsed["Message-ID"] == _message_id(n)
            assert parsed.get_body(("plain",)) is not None


def test_the_property_also_holds_for_a_database_source(composer: Composer, tmp_path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect("p.db")
    with conn:
        conn.execute("CREATE TABLE instructors (name TEXT, email TEXT, course TEXT)")
        conn.executemany("INSERT INTO instructors VALUES (?, ?, ?)", [r[:3] for r in ROWS])
    conn.close()
    source = open_db("sqlite:///p.db", "SELECT name, email, course FROM instructors")
    sent = set()
    for n, recipient in enumerate(source, 1):
        if recipient.skip_reason is None:
            message = composer.build(recipient, _message_id(n))
            [to] = parse(message.to_bytes())["To"].addresses
            sent.add(to.addr_spec)
    assert sent == SENT


# --------------------------------------------------------------------------- hostile queries


SELECT = "SELECT name, email FROM instructors"
HOSTILE_QUERIES = [
    # nested block comments: PostgreSQL ends the comment at the second */, a naive splitter
    # at the first one and then sees a string up to the last quote
    f"{SELECT} /* /* */ ' */; COMMIT; DELETE FROM instructors WHERE id = 2; -- '",
    # dollar-quoted strings, tagged and plain
    f"{SELECT} WHERE name <> $a$ ' $a$; COMMIT; DELETE FROM instructors WHERE id = 2; -- '",
    f"{SELECT} WHERE name <> $$ ' $$; COMMIT; DELETE FROM courses; -- '",
    f"{SELECT} WHERE name <> $q$ $$ ' $q$; COMMIT; TRUNCATE courses; -- '",
    f"{SELECT} /* /* */ ' */; SET TRANSACTION READ WRITE; DELETE FROM courses; -- '",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_a_hostile_query_changes_nothing_in_postgresql(pg_url: str, query: str) -> None:
    from bulkmail.errors import InputError

    course_tables(pg_url)
    before = table_contents(pg_url)
    assert len(before["instructors"]) == 12
    with pytest.raises(InputError) as refused:
        list(open_db(pg_url, query))
    assert str(refused.value).startswith("--query: only a single SELECT"), refused.value
    assert table_contents(pg_url) == before


@pytest.mark.parametrize("query", HOSTILE_QUERIES[:2])
def test_a_hostile_query_through_dry_run_and_preview_changes_nothing(
    pg_url: str, query: str
) -> None:
    course_tables(pg_url)
    before = table_contents(pg_url)
    Path("t.txt").write_text("Dear {{ name }}\n", encoding="utf-8")
    args = ["--db", pg_url, "--query", query, "--template", "t.txt", "--subject", "Hi"]
    for command in (["send-reminders", "--yes", *args, "--dry-run"], ["preview", *args]):
        result = bulkmail(*command)
        assert result.exit_code == 2, result.output
        assert "--query: only a single SELECT" in result.stderr
        assert table_contents(pg_url) == before


def test_compose_refuses_a_line_break_in_a_rendered_header_whatever_the_source(
    tmp_path: Path,
) -> None:
    """The backstop behind ``Source.header_columns``: a body-only value that still reaches
    the subject or an attachment's file name (a caller that did not say which columns reach
    a header) refuses the job, naming the row; nothing is built."""
    from bulkmail.errors import InputError
    from bulkmail.models import Recipient

    Path("t.txt").write_text("{{ notes }}\n", encoding="utf-8")
    Path("files").mkdir()
    notes = "Room 4\nBcc: victim@example.org"
    ada = Recipient(
        row=2,
        email="ada@example.edu",
        name="Ada",
        fields={"email": "ada@example.edu", "notes": notes},
    )
    body_only = Composer(
        Templates.load(subject="Reminder", text_path="t.txt"), sender="office@example.edu"
    )
    body_only.check(ada, "n.csv")
    assert body_only.build(ada, _message_id(1)).text == f"{notes}\n"
    in_subject = Composer(
        Templates.load(subject="About {{ notes }}", text_path="t.txt"), sender="office@example.edu"
    )
    assert in_subject.header_variables == {"notes"}
    with pytest.raises(InputError, match=r"^n\.csv: row 2: subject contains a line feed \(LF\)"):
        in_subject.check(ada, "n.csv")
    in_name = Composer(
        Templates.load(subject="Hi", text_path="t.txt", attach=["files/{{ notes }}.txt"]),
        sender="office@example.edu",
    )
    assert in_name.header_variables == {"notes"}
    with pytest.raises(InputError, match=r"^n\.csv: row 2: attachment file name .* line feed"):
        in_name.check(ada, "n.csv")
