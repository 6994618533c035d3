"""The one definition of a value that must not go into a mail header.

Shared by ``sources`` (such a row becomes a ``skipped`` delivery with the reason) and
``compose`` (which refuses to build a header from such a value, whatever the source): one
function, so the two can never disagree about what is safe. Standard library only, so that
importing ``sources`` stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from email import quoprimime

__all__ = ["header_safe_problem", "plainly_safe"]

_LINE_BREAKS = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\0": "a NUL character"}
# Characters str.splitlines() treats as line boundaries besides CR and LF: EmailMessage refuses
# them in a header value, and some readers break lines on them.
_UNICODE_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")


# every character _control_char reports, for one regex scan instead of a loop per character
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def _control_char(text: str) -> str | None:
    """What the first character unsafe in a header is, e.g. "a line feed (LF)"; or None."""
    match = _UNSAFE.search(text)
    if match is None:
        return None
    ch = match.group()
    if ch in _LINE_BREAKS:
        return _LINE_BREAKS[ch]
    if ch in _UNICODE_BREAKS:
        return f"a line separator (U+{ord(ch):04X})"
    return f"a control character (U+{ord(ch):04X})"


def _decode_encoded_word(charset: str, encoding: str, payload: str) -> list[str]:
    """The text of one RFC 2047 encoded word, decoded as its charset says and as Latin-1 (a
    reader may ignore or misread the charset); empty when the payload does not decode."""
    try:
        if encoding in "qQ":
            raw = quoprimime.header_decode(payload).encode("latin-1")
        else:
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4))
    except (ValueError, binascii.Error):
        return []
    texts = [raw.decode("latin-1")]
    with contextlib.suppress(LookupError, ValueError):  # unknown charset: Latin-1 will do
        texts.append(raw.decode(charset.partition("*")[0], errors="replace"))  # utf-8*en
    return texts


def header_safe_problem(value: str) -> str | None:
    """Why ``value`` must not go into a mail header (e.g. "contains a line feed (LF)"), or
    None when it is safe.

    Unsafe: CR, LF, NUL, any other C0 control except TAB, DEL, the other characters
    ``str.splitlines`` breaks lines on (VT, FF, FS, GS, RS, NEL, U+2028, U+2029), and RFC 2047
    encoded words (``=?UTF-8?Q?=0A?=``, ``=?utf-8?b?DQo=?=``) whose decoded text has any of
    those: a reader that decodes them would see a line break.
    """
    found = _control_char(value)
    if found is not None:
        return f"contains {found}"
    if "=?" not in value:
        return None
    for match in _ENCODED_WORD.finditer(value):
        for decoded in _decode_encoded_word(*match.groups()):
            found = _control_char(decoded)
            if found is not None:
                return f"has an encoded word {match.group(0)!r} that decodes to {found}"
    return None


def plainly_safe(text: str) -> bool:
    """A quick test that is only ever True when ``header_safe_problem`` finds nothing in
    ``text``, nor in any of the values joined with spaces to make it: printable text (no
    control character, no line separator) without "=?" (so no encoded word). False says
    nothing either way: ask ``header_safe_problem``. For the common row, one call instead
    of one per value."""
    return text.isprintable() and "=?" not in text
