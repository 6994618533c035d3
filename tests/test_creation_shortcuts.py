"""The short cuts that make job creation fast give exactly the answers of the long way:
the one-call header check of a row, the plain-template renderer, the chunked UTF-8 line
reader, the direct JSON of a delivery's fields and the row builder."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkmail import sources
from bulkmail.compose import _environment, _Plain
from bulkmail.headersafe import header_safe_problem, plainly_safe
from bulkmail.models import Recipient
from bulkmail.sources import (
    _Builder,
    _deliverable,
    _layout,
    _Lines,
    _NotDecodable,
    _one_line,
    _quote,
)
from bulkmail.store.sql import _JSON, _fields_json

# text with the characters that matter: controls, line separators, encoded-word pieces
_TRICKY = st.text(
    alphabet=st.one_of(
        st.sampled_from("=?QqBb_ \t\r\n\x00\x0b\x85\u2028\u2029%{}"),
        st.characters(codec="utf-8"),
    ),
    max_size=20,
)


@given(st.lists(_TRICKY, max_size=5))
@settings(max_examples=200, deadline=None)
def test_plainly_safe_is_only_true_when_every_value_is_header_safe(values: list[str]) -> None:
    if plainly_safe(" ".join(values)):
        assert all(header_safe_problem(v) is None for v in values)
        assert all(sources._body_safe_problem(v) is None for v in values)


def test_plainly_safe_says_false_for_what_needs_a_closer_look() -> None:
    assert plainly_safe("Ada Lovelace ada@example.edu Zoë Ångström")
    for value in ("a\rb", "a\nb", "a\tb", "=?utf-8?q?=0A?=", "a\u2028b", "a\x85b"):
        assert not plainly_safe(value)


# ------------------------------------------------------------------ plain templates

_NAMES = ["course", "due_date", "name", "row", "columns", "range", "missing", "self", "loop"]
_PIECE = st.one_of(
    st.text(alphabet="ab %s{}#\n\r\t-", max_size=8).filter(
        lambda t: not any(d in t for d in ("{{", "{%", "{#", "}}", "%}", "#}"))
    ),
    st.sampled_from(_NAMES).map(lambda n: "{{ " + n + " }}"),
    st.sampled_from(_NAMES).map(lambda n: "{{- " + n + " -}}"),
    st.sampled_from(["{% raw %}{{ x }}{% endraw %}", "{{ course|upper }}", "{# c #}"]),
    st.sampled_from(["{% if row %}y{% endif %}", "{% set course = 'x' %}", "{{ 'lit' }}"]),
)
_VALUE = st.one_of(st.text(max_size=6), st.integers(), st.just({"a": "1"}))


@given(
    pieces=st.lists(_PIECE, max_size=6),
    values=st.dictionaries(st.sampled_from(_NAMES[:5]), _VALUE),
)
@settings(max_examples=200, deadline=None)
def test_plain_templates_render_exactly_as_jinja2(
    pieces: list[str], values: dict[str, Any]
) -> None:
    env = _environment(html=False)
    source = "".join(pieces)
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError:
        return  # two pieces made a delimiter: refused before anything is rendered
    context = {**env.globals, **values}
    plain = _Plain.of(env.parse(source))
    try:
        expected: str | None = template.render(values)
    except jinja2.UndefinedError:
        expected = None
    if plain is None:
        return  # jinja2 renders it
    try:
        got: str | None = plain.render(context)
    except KeyError:
        got = None  # the composer then asks jinja2, which raises
    assert got == expected


def test_what_the_plain_renderer_takes_and_leaves() -> None:
    env = _environment(html=False)
    assert _Plain.of(env.parse("Reminder: {{ course }} due {{ due_date }}")) is not None
    for source in ("{{ self }}", "{{ a|upper }}", "{% if a %}x{% endif %}", "{{ a.b }}"):
        assert _Plain.of(env.parse(source)) is None
    plain = _Plain.of(env.parse("100% {{ a }} %s"))
    assert plain is not None
    assert plain.render({"a": "%d"}) == "100% %d %s"


# ------------------------------------------------------------------ the line reader

_BARE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _reference_lines(data: bytes, encoding: str = "utf-8") -> Iterator[str]:
    """The reader as it was: one physical line at a time (LF, CRLF or a bare CR)."""
    count = 0
    for raw in io.BytesIO(data):
        for piece in (p for p in _BARE_CR.split(raw) if p):
            count += 1
            codec = "utf-8-sig" if count == 1 and encoding == "utf-8" else encoding
            try:
                yield piece.decode(codec)
            except UnicodeDecodeError:
                raise _NotDecodable(count) from None


def _read(lines: Iterator[str]) -> tuple[list[str], int | None]:
    got: list[str] = []
    try:
        for line in lines:
            got.append(line)
    except _NotDecodable as exc:
        return got, exc.line
    return got, None


_LINE_BYTES = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xc3\xa9"]),
        st.binary(max_size=5),
        st.text(max_size=5).map(lambda t: t.encode("utf-8")),
    ),
    max_size=30,
).map(b"".join)


@given(data=_LINE_BYTES, chunk=st.integers(min_value=1, max_value=12))
@settings(max_examples=300, deadline=None)
def test_chunked_lines_are_the_lines_one_by_one(data: bytes, chunk: int) -> None:
    saved = sources._CHUNK
    sources._CHUNK = chunk  # chunks of a line or a few
    try:
        assert _read(iter(_Lines(io.BytesIO(data)))) == _read(_reference_lines(data))
    finally:
        sources._CHUNK = saved


@given(data=_LINE_BYTES)
@settings(max_examples=200, deadline=None)
def test_other_encodings_still_read_line_by_line(data: bytes) -> None:
    assert _read(iter(_Lines(io.BytesIO(data), "cp1252"))) == _read(
        _reference_lines(data, "cp1252")
    )


def test_a_bad_byte_past_the_first_chunk_names_its_row(tmp_path: Any) -> None:
    from bulkmail.errors import InputError

    rows = [f"Person {i},p{i}@example.edu" for i in range(5000)]
    rows[4321] = "Ren\xe9,bad@example.edu"
    path = tmp_path / "big.csv"
    path.write_bytes(("name,email\n" + "\n".join(rows) + "\n").encode("latin-1"))
    source = sources.open_csv(path)
    with pytest.raises(InputError, match=r"big\.csv: row 4323: not valid UTF-8"):
        list(source)


# ------------------------------------------------------------------ JSON of the fields


@given(
    st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers()),
        st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()),
        max_size=6,
    )
)
@settings(max_examples=300, deadline=None)
def test_fields_json_is_the_encoders(fields: dict[Any, Any]) -> None:
    assert _fields_json(fields) == _JSON.encode(fields)
    assert json.loads(_fields_json(fields)) == json.loads(_JSON.encode(fields))


# ------------------------------------------------------------------ the row builder


def _reference_build(
    builder: _Builder, seen: dict[str, int], row: int, raw: Sequence[str]
) -> Recipient:
    """The row builder as it was: every value checked one by one."""
    from email_validator import EmailNotValidError

    fields: dict[str, str] = {}
    reason: str | None = None
    layout = builder.layout
    for label, key, pos, check in zip(
        layout.labels, layout.keys, layout.positions, builder.checks, strict=True
    ):
        value = raw[pos] if pos < len(raw) else ""
        if reason is None:
            problem = check(value)
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
                first = seen.get(email.casefold())
                if first is not None:
                    reason = f"duplicate of row {first}"
                else:
                    seen[email.casefold()] = row
    fields["email"] = email
    return Recipient(row, email, fields.get("name", ""), fields, reason)


_CELL = st.one_of(
    _TRICKY,
    st.sampled_from(["ada@example.edu", "ADA@example.edu", " ben@example.edu ", "x@", ""]),
)


@given(
    header=st.sampled_from(
        [
            ["name", "email", "notes"],
            ["email", "", "course"],  # an unnamed column
            ["Course", "E-mail", "Name", "due"],
        ]
    ),
    rows=st.lists(st.lists(_CELL, max_size=5), min_size=1, max_size=6),
    body_only=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_the_row_builder_gives_what_it_gave(
    header: list[str], rows: list[list[str]], body_only: bool
) -> None:
    layout = _layout("t.csv", header, "header")
    columns = () if body_only else None
    fast, slow = _Builder(layout, columns), _Builder(layout, columns)
    seen: dict[str, int] = {}
    for number, raw in enumerate(rows, 2):
        assert fast.build(number, raw) == _reference_build(slow, seen, number, raw)
