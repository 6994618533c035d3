"""7-bit MIME for SMTP servers that do not offer 8BITMIME (RFC 6152): the fast path and the
reference path agree, and no byte over 127 is left."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkmail.mime import to_bytes, to_bytes_fast
from bulkmail.models import Attachment
from tests.test_mime import _BODY, _assert_equivalent, _message, _no_email_message, _view


def test_non_ascii_text_parts_become_quoted_printable_or_base64() -> None:
    m = _message(subject="Grüße", text="Grüße aus Köln\n", html="<p>Grüße</p>\n")
    with _no_email_message():
        fast = to_bytes_fast(m, seven_bit=True)
    assert fast.isascii()
    assert b"8bit" not in fast
    slow = to_bytes(m, seven_bit=True)
    assert slow.isascii()
    _assert_equivalent(m, fast, slow)
    view = _view(fast)
    assert view["Subject"] == "Grüße"
    assert [part[2] for part in view["parts"][1:]] == ["base64", "quoted-printable"]
    bodies = [part[3].replace("\r\n", "\n") for part in view["parts"][1:]]
    assert bodies == ["Grüße aus Köln\n", "<p>Grüße</p>\n"]


def test_ascii_messages_are_unchanged() -> None:
    m = _message(html="<p>Hello</p>\n")
    assert to_bytes_fast(m, seven_bit=True) == to_bytes_fast(m)


def test_the_reference_path_is_seven_bit_too() -> None:
    m = _message(text="Grüße\n", attachments=(Attachment("a.bin", "application/x", b"\xff"),))
    data = to_bytes_fast(m, seven_bit=True)
    assert data.isascii()
    assert not to_bytes_fast(m).isascii()  # 8bit where the server allows it


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=_BODY, html=st.none() | _BODY)
def test_seven_bit_fast_path_reads_back_like_email_message(text: str, html: str | None) -> None:
    m = _message(subject="Café ✓", to_name="Zoë", text=text, html=html)
    fast = to_bytes_fast(m, seven_bit=True)
    assert fast.isascii()
    _assert_equivalent(m, fast, to_bytes(m, seven_bit=True))
