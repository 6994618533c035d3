"""A message as MIME bytes: the EmailMessage reference path and the fast path that must
read back the same (bulkmail.mime)."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkmail import mime
from bulkmail.mime import to_bytes_fast
from bulkmail.models import Attachment, Message


def _no_email_message() -> Any:
    """Within it, building an EmailMessage (the reference path, every fallback) fails."""
    return mock.patch.object(mime, "to_email_message", side_effect=AssertionError("slow path"))


def test_non_ascii_display_name_round_trips() -> None:
    m = Message("office@example.edu", "Course Office", "zoe@example.org", "Zoë Ångström",
                "Réunion", "Bonjour Zoë\n", "<bulkmail.1.1@example.edu>")  # fmt: skip
    raw = m.to_email_message().as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    (to,) = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Zoë Ångström", "zoe@example.org")
    assert str(parsed["Subject"]) == "Réunion"
    assert parsed.get_content() == "Bonjour Zoë\r\n"  # an 8bit body keeps the wire CRLF


# --------------------------------------------------------------------------- fast path

BOUNDARY = re.compile(rb"===============\d{19}==(?:\.\d+)?")


def _message(**overrides: Any) -> Message:
    values: dict[str, Any] = {
        "from_email": "office@example.edu",
        "from_name": "Course Office",
        "to_email": "ada@example.org",
        "to_name": "Ada Lovelace",
        "subject": "Reminder: CS101 sheets are due on Friday",
        "text": "Hello Ada,\n\nplease send the CS101 sheets.\n",
        "message_id": "<bulkmail.12.345@example.edu>",
    }
    values.update(overrides)
    return Message(**values)


def _view(raw: bytes) -> dict[str, Any]:
    """What a reader sees: top-level headers decoded, then each part's headers (boundary
    apart) and decoded body."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    view: dict[str, Any] = {
        key: [(a.display_name, a.addr_spec) for a in msg[key].addresses] for key in ("From", "To")
    }
    view["Subject"] = str(msg["Subject"])
    view["Message-ID"] = str(msg["Message-ID"])
    parts = []
    for part in msg.walk():
        assert isinstance(part, EmailMessage)
        params = [(k, v) for k, v in part.get_params() or [] if k != "boundary"]
        body = None if part.is_multipart() else part.get_content()
        parts.append((list(part.keys()), params, part["Content-Transfer-Encoding"], body))
    view["parts"] = parts
    return view


def _intended(m: Message) -> dict[str, Any]:
    return {
        "From": [(m.from_name, m.from_email)],
        "To": [(m.to_name, m.to_email)],
        "Subject": m.subject,
    }


def _assert_equivalent(m: Message, fast: bytes, slow: bytes) -> None:
    assert b"\n" not in fast.replace(b"\r\n", b"") and b"\r" not in fast.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in fast.split(b"\r\n"))
    if fast == slow:  # fell back (or single-part and identical): nothing more to compare
        return
    got, want, intended = _view(fast), _view(slow), _intended(m)
    for key in ("From", "To", "Subject"):
        # EmailMessage itself loses a space in a few foldings; the fast path never does
        assert got[key] in (want[key], intended[key]), key
    assert got["Message-ID"] == want["Message-ID"]
    assert got["parts"] == want["parts"]


def test_fast_path_is_byte_identical_in_the_common_case() -> None:
    for m in (
        _message(),
        _message(html="<p>Hello Ada,</p>\n<p>please send the sheets.</p>\n"),
        _message(to_name="Zoë Ångström", subject="Café — 2 weeks left", text="Grüße\n"),
        _message(to_name="O'Brien, Seán", text="x" * 100 + "\n", html="é" * 100),
        _message(to_name="", from_name="", subject="", text=""),
        _message(subject="word " * 30 + "end"),
    ):
        fast, slow = to_bytes_fast(m), m.to_bytes()
        assert BOUNDARY.sub(b"B", fast) == BOUNDARY.sub(b"B", slow)
        assert to_bytes_fast(m) == fast  # the boundary is derived from the content
        _assert_equivalent(m, fast, slow)


def test_fast_path_does_not_build_an_email_message() -> None:
    m = _message(to_name="Zoë Ångström", subject="Café", html="<p>é</p>")
    slow = m.to_bytes()
    with _no_email_message():
        fast = to_bytes_fast(m)
    _assert_equivalent(m, fast, slow)


def test_fast_path_falls_back_for_attachments_and_odd_values() -> None:
    attached = _message(attachments=(Attachment("a.pdf", "application/pdf", b"%PDF"),))
    _assert_equivalent(attached, to_bytes_fast(attached), attached.to_bytes())
    assert b'filename="a.pdf"' in to_bytes_fast(attached)
    for m in (_message(subject="=?utf-8?q?x?="), _message(to_name="Ada  Lovelace")):
        assert to_bytes_fast(m) == m.to_bytes()
    with pytest.raises(ValueError):  # EmailMessage's own refusal, not hidden
        to_bytes_fast(_message(subject="a\u2028b"))


def test_non_ascii_local_part_is_sent_as_an_smtputf8_message() -> None:
    """EmailMessage's SMTP policy would write ``=?utf-8?q?zo=C3=AB?=@example.org``: an
    encoded word inside an address, which readers must not decode. Such an address only
    travels with SMTPUTF8, where headers are plain UTF-8 (RFC 6532)."""
    m = _message(to_email="zoë@example.org", to_name="Zoë", subject="Café", html="<p>é</p>")
    data = to_bytes_fast(m)
    assert b"=?" not in data.split(b"\r\n\r\n", 1)[0]
    assert "To: Zoë <zoë@example.org>\r\n".encode() in data
    assert "Subject: Café\r\n".encode() in data
    parsed = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "zoë@example.org"
    body = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert body.get_body(("html",)).get_content() == "<p>é</p>\n"  # type: ignore[union-attr]
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


_ODD = st.characters(codec="utf-8", exclude_characters="\r\n")
_PIECES = st.sampled_from(
    [" ", "  ", "a", "Ada", "Zoë", "Ångström", "李", "😀", '"', "\\", ",", ".", "(", ")", "=",
     "?", "_", "'", "-", ":", "<", "@", "\t", "\u00a0", "x" * 30, "é" * 25]
)  # fmt: skip
_HEADER_TEXT = st.text(_ODD, max_size=40) | st.lists(_PIECES, max_size=25).map("".join)
_BODY = st.text(st.characters(codec="utf-8"), max_size=200) | st.lists(
    st.sampled_from(["a", "é", "\n", "\r\n", "\r", " ", "x" * 50, "=", ".", "From ", "😀"]),
    max_size=40,
).map("".join)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    from_name=_HEADER_TEXT,
    to_name=_HEADER_TEXT,
    subject=_HEADER_TEXT | st.lists(_PIECES, max_size=60).map("".join),
    text=_BODY,
    html=st.none() | _BODY,
    to_email=st.sampled_from(["ada@example.org", "o'brien+x@sub.example.co.uk", "a@b"]),
)
def test_fast_path_parses_back_like_email_message(
    from_name: str, to_name: str, subject: str, text: str, html: str | None, to_email: str
) -> None:
    m = _message(
        from_name=from_name, to_name=to_name, subject=subject, text=text, html=html,
        to_email=to_email,
    )  # fmt: skip
    try:
        slow = m.to_bytes()
    except ValueError as exc:  # EmailMessage refuses the value: so must the fast path
        with pytest.raises(type(exc)):
            to_bytes_fast(m)
        return
    _assert_equivalent(m, to_bytes_fast(m), slow)


_WORD = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèüöÅßçñ李😀.,:'()-!?"),
    min_size=1,
    max_size=12,
)


_NAME_PART = st.sampled_from(
    ["Ada", "Zoë", "Ångström", "O'Brien", "Jean-Luc", "Müller", "李小龍", "Dr.", "Łukasz", "Nguyễn"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    to_name=st.lists(_NAME_PART, max_size=3).map(" ".join),
    subject=st.lists(_WORD, max_size=14).map(" ".join),
    text=_BODY,
    html=st.none() | _BODY,
)
def test_fast_path_takes_realistic_messages_itself(
    to_name: str, subject: str, text: str, html: str | None
) -> None:
    m = _message(to_name=to_name, subject=subject, text=text, html=html)
    slow = m.to_bytes()
    with _no_email_message():
        fast = to_bytes_fast(m)
    _assert_equivalent(m, fast, slow)
    view = _view(fast)
    assert (view["To"], view["Subject"]) == ([(to_name, m.to_email)], subject)
