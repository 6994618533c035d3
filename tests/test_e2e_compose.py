"""HTML bodies and per-recipient attachments, end to end through the command line, read back
at a real SMTP server on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bulkmail.compose import MAX_ATTACHMENT_BYTES
from tests.e2e import assert_refused, bulkmail, smtp_args, smtp_env
from tests.smtp_sink import SmtpSink

PEOPLE = (
    "name,email,course\n"
    "Ada Lovelace,ada@example.edu,CS101\n"
    "<script>alert(1)</script>,eve@example.org,CS102\n"
    "Zoë Ångström,zoe@example.edu,PHYS210\n"
)


def setup_files(html: bool = True) -> None:
    Path("people.csv").write_text(PEOPLE, encoding="utf-8")
    Path("t.txt").write_text("Dear {{ name }},\nyour course {{ course }}.\n", encoding="utf-8")
    if html:
        Path("t.html").write_text(
            "<p>Dear {{ name }},</p>\n<p>your course <b>{{ course }}</b>.</p>\n", encoding="utf-8"
        )


def send(sink: SmtpSink, *extra: str) -> Any:
    return bulkmail(
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt",
        "--subject", "{{ course }}: {{ name }}", *smtp_args(), "--json", *extra,
        env=smtp_env(sink),
    )  # fmt: skip


def test_html_template_gives_multipart_alternative_with_the_name_escaped(
    smtp_sink: SmtpSink,
) -> None:
    setup_files()
    result = send(smtp_sink, "--html-template", "t.html")
    assert result.exit_code == 0, result.output
    by_to = {m.rcpt_tos[0]: m.parse() for m in smtp_sink.messages}
    assert set(by_to) == {"ada@example.edu", "eve@example.org", "zoe@example.edu"}
    for message in by_to.values():
        assert message.get_content_type() == "multipart/alternative"
        parts = [p.get_content_type() for p in message.iter_parts()]
        assert parts == ["text/plain", "text/html"]
    eve = by_to["eve@example.org"]
    text = eve.get_body(("plain",))
    html = eve.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content() == "Dear <script>alert(1)</script>,\nyour course CS102.\n"
    assert html.get_content() == (
        "<p>Dear &lt;script&gt;alert(1)&lt;/script&gt;,</p>\n<p>your course <b>CS102</b>.</p>\n"
    )
    assert "<script>" not in html.get_content()
    # the name in the header is the literal text, quoted, and still one address
    [to] = eve["To"].addresses
    assert (to.display_name, to.addr_spec) == ("<script>alert(1)</script>", "eve@example.org")
    assert eve["Subject"] == "CS102: <script>alert(1)</script>"
    zoe = by_to["zoe@example.edu"].get_body(("html",))
    assert zoe is not None and "Dear Zoë Ångström," in zoe.get_content()


def make_sheets() -> dict[str, bytes]:
    sheets = {
        "CS101": b"%PDF-1.4 CS101 \x00\xff grades",
        "CS102": b"%PDF-1.4 CS102 \x80 other bytes",
        "PHYS210": b"%PDF-1.4 PHYS210\r\n\x00",
    }
    Path("sheets").mkdir()
    for course, data in sheets.items():
        Path("sheets", f"{course}.pdf").write_bytes(data)
    return sheets


def test_each_message_carries_its_own_attachment(smtp_sink: SmtpSink) -> None:
    setup_files(html=False)
    sheets = make_sheets()
    Path("common.txt").write_text("office hours: Mon 10-12\n", encoding="utf-8")
    result = send(smtp_sink, "--attach", "sheets/{{ course }}.pdf", "--attach", "common.txt")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 3
    assert len(smtp_sink.messages) == 3
    for received in smtp_sink.messages:
        message = received.parse()
        course = str(message["Subject"]).split(":")[0]
        body = message.get_body(("plain",))
        assert body is not None and f"your course {course}." in body.get_content()
        attachments = list(message.iter_attachments())
        assert [a.get_filename() for a in attachments] == [f"{course}.pdf", "common.txt"]
        pdf, txt = attachments
        assert pdf.get_content_type() == "application/pdf"
        assert pdf.get_content() == sheets[course]
        assert txt.get_content_type() == "text/plain"
        assert txt.get_content() == "office hours: Mon 10-12\n"


def test_a_missing_attachment_for_one_row_sends_nothing(smtp_sink: SmtpSink) -> None:
    setup_files(html=False)
    make_sheets()
    os.remove("sheets/CS102.pdf")
    result = send(smtp_sink, "--attach", "sheets/{{ course }}.pdf", "--yes")
    assert_refused(
        result, "people.csv: row 3: attachment 'sheets/CS102.pdf' not found", sink=smtp_sink
    )
    # one connection: the pre-flight check (greeting, EHLO, QUIT) before the rows are
    # rendered; no message, no job
    assert smtp_sink.connections == 1 and smtp_sink.messages == []


def test_an_attachment_over_the_limit_sends_nothing(smtp_sink: SmtpSink) -> None:
    setup_files(html=False)
    make_sheets()
    os.truncate("sheets/PHYS210.pdf", MAX_ATTACHMENT_BYTES + 1)  # sparse: cheap
    result = send(smtp_sink, "--attach", "sheets/{{ course }}.pdf", "--yes")
    assert_refused(
        result,
        "people.csv: row 4: attachment 'sheets/PHYS210.pdf' is 10.0 MB, over the 10.0 MB limit",
        sink=smtp_sink,
    )


def test_a_value_cannot_attach_a_file_outside_the_folder(smtp_sink: SmtpSink) -> None:
    """A hostile row must not mail out a file of the operator's (an SSH key...)."""
    Path("people.csv").write_text(
        "name,email,course\nAda,ada@example.edu,CS101\nEve,eve@example.org,../secret\n",
        encoding="utf-8",
    )
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    make_sheets()
    Path("secret.pdf").write_bytes(b"private key material")
    result = send(smtp_sink, "--attach", "sheets/{{ course }}.pdf", "--yes")
    assert_refused(
        result,
        "people.csv: row 3: --attach 'sheets/{{ course }}.pdf' renders 'sheets/../secret.pdf', "
        "outside the folder 'sheets/'",
        sink=smtp_sink,
    )
