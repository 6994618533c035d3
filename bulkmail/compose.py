"""Rendering the subject, text and HTML templates for one recipient, and building its message.

``Templates.load`` reads and syntax-checks the template files once; a ``Composer`` compiles
them once and renders them per recipient with ``StrictUndefined`` (the HTML body autoescaped).
``Composer.check`` renders everything a send will render and raises ``InputError`` naming the
source, row, template and variable at fault, so a job is refused before anything is sent.

No header value built here may carry a line break: ``header_safe_problem`` (defined in
``bulkmail.headersafe``, shared with ``sources`` and re-exported here) says why a value is
unsafe (CR, LF, NUL, other controls, Unicode line separators, or an RFC 2047 encoded word that
decodes to one of those).

The message built here becomes bytes in ``bulkmail.mime``.
"""

from __future__ import annotations

import difflib
import functools
import mimetypes
import operator
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
from email_validator import EmailNotValidError, validate_email
from jinja2 import meta
from jinja2.exceptions import SecurityError

from bulkmail.errors import InputError, file_error
from bulkmail.headersafe import header_safe_problem, plainly_safe
from bulkmail.models import Attachment, Message, Recipient

__all__ = [
    "BUILTIN_VARIABLES",
    "COLUMNS_VARIABLE",
    "MAX_ATTACHMENT_BYTES",
    "Composer",
    "Rendered",
    "TemplateNames",
    "Templates",
    "VariableUse",
    "header_safe_problem",
    "identifier",
    "template_names",
]

MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
"""Limit for one attachment file and for all attachments of one message together."""

BUILTIN_VARIABLES = frozenset({"name", "email", "row"})
"""Variables every recipient provides whatever the source's columns (``row``: its number)."""

COLUMNS_VARIABLE = "columns"
"""The mapping of every column by its name as written in the source: ``columns["Due Date"]``
(``columns["email"]`` and ``columns["name"]`` for the address and name columns). A real
column of that name wins over it."""


# --------------------------------------------------------------------------- column names


def identifier(column: str) -> str:
    """The snake_case template name offered for a column: ``Due Date`` -> ``due_date``.

    Lower-case; every run of characters other than letters and digits becomes one '_';
    no '_' at either end; a leading digit gets a '_' prefix (``2nd Reader`` ->
    ``_2nd_reader``). Empty when the name has no letter or digit at all.
    """
    name = re.sub(r"[\W_]+", "_", column.casefold()).strip("_")
    if name and not name.isidentifier():
        name = "_" + name
    return name if name.isidentifier() else ""


@dataclass(frozen=True)
class TemplateNames:
    """The names templates may use for a source's columns, beyond the columns' own."""

    aliases: dict[str, str]  # snake_case name -> the column it stands for
    # a snake_case name several columns (or a built-in variable) wanted -> those columns,
    # in order; the first (or the built-in) kept it
    clashes: dict[str, tuple[str, ...]]

    def column(self, name: str, columns: Sequence[str]) -> str | None:
        """The column a template name stands for, or None (a built-in, or nothing)."""
        if name in columns:
            return name
        return self.aliases.get(name)


@functools.lru_cache(maxsize=64)
def template_names(columns: tuple[str, ...]) -> TemplateNames:
    """The snake_case names offered for ``columns`` (in the source's order: on a clash the
    first column keeps the name; a real column or a built-in variable always does)."""
    taken = set(columns) | BUILTIN_VARIABLES | {COLUMNS_VARIABLE}
    aliases: dict[str, str] = {}
    clashes: dict[str, list[str]] = {}
    for column in columns:
        name = identifier(column)
        if not name or name == column:
            continue
        if name in aliases:
            clashes.setdefault(name, [aliases[name]]).append(column)
        elif name in taken:
            clashes.setdefault(name, [name if name in columns else ""]).append(column)
        else:
            aliases[name] = column
    return TemplateNames(aliases, {k: tuple(v) for k, v in clashes.items()})


def _context(fields: Mapping[str, str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A row's template variables: its columns, their snake_case names, ``columns``; on top
    of ``base`` (the templates' globals), which every one of those hides."""
    names = template_names(tuple(fields))
    context: dict[str, Any] = {} if base is None else dict(base)
    context[COLUMNS_VARIABLE] = dict(fields)
    for name, column in names.aliases.items():
        context[name] = fields[column]
    context.update(fields)
    return context


@dataclass(frozen=True)
class VariableUse:
    """Where a template uses a variable the source must provide."""

    name: str  # as written: 'due_date', or 'columns["Due Date"]'
    column: str | None  # for columns["..."]: the column named; else None
    part: str  # 'subject', 'text template', 'HTML template' or 'attachment path'
    where: str  # for messages: 'subject', 'text template reminder.txt, line 3', ...
    printed: bool  # the value reaches the output as is (not only tested, nor defaulted)


_GUARDING_FILTERS = frozenset({"default", "d"})


_Found = dict[tuple[str, str | None], tuple[int, bool]]


def _walk_uses(node: jinja2.nodes.Node, guarded: frozenset[str], found: _Found) -> None:
    """Every variable ``node`` reads: (name, None), or (``columns``, key) for
    ``columns["key"]`` -> (first line, printed).

    A value that is only tested (``{% if course %}``, ``x if course``, ``course is
    defined``), looped over, given a ``default``, or printed inside an ``if`` that tests
    it, is not 'printed': an empty value there is the template's own business.
    """

    def note(name: str, column: str | None, lineno: int, printed: bool) -> None:
        line, before = found.get((name, column), (lineno, False))
        found[name, column] = (min(line, lineno), before or printed)

    def quiet(child: jinja2.nodes.Node) -> None:
        _walk_uses(child, frozenset({"*"}), found)

    nodes = jinja2.nodes
    if isinstance(node, nodes.If):
        quiet(node.test)
        inner: _Found = {}
        _walk_uses(node.test, frozenset(), inner)
        tested = frozenset(name if column is None else f"[{column}]" for name, column in inner)
        for child in (*node.body, *node.elif_, *node.else_):
            _walk_uses(child, guarded | tested, found)
        return
    if isinstance(node, nodes.For):
        quiet(node.iter)
        if node.test is not None:
            quiet(node.test)
        for child in (*node.body, *node.else_):
            _walk_uses(child, guarded, found)
        return
    if isinstance(node, nodes.CondExpr | nodes.Test) or (
        isinstance(node, nodes.Filter) and node.name in _GUARDING_FILTERS
    ):
        for child in node.iter_child_nodes():
            quiet(child)
        return
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name == COLUMNS_VARIABLE
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        printed = not guarded & {"*", COLUMNS_VARIABLE, f"[{node.arg.value}]"}
        note(COLUMNS_VARIABLE, node.arg.value, node.lineno, printed)
        return
    if isinstance(node, nodes.Name) and node.ctx == "load":
        note(node.name, None, node.lineno, "*" not in guarded and node.name not in guarded)
        return
    for child in node.iter_child_nodes():
        _walk_uses(child, guarded, found)


# --------------------------------------------------------------------------- templates


MAX_PRODUCT = 1_000_000
"""The longest text or list a template's ``*`` may make (``'x' * 10**10`` would take the
server's memory: a template may come from a web request)."""


MAX_RENDERED = 10_000_000
"""The most characters one template may render for one recipient."""


class _Sandbox(jinja2.sandbox.SandboxedEnvironment):
    """Jinja2's sandbox (no way to Python's internals), whose ``*`` and ``**`` also refuse
    a result too large to be a reminder's (``range`` is already limited by the sandbox)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError(f"'**' with an exponent of {right} is refused")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > MAX_PRODUCT
                ):
                    raise SecurityError(
                        f"'*' would make {len(seq) * n:,} items (at most {MAX_PRODUCT:,})"
                    )
        return super().call_binop(context, operator, left, right)


def _environment(*, html: bool) -> jinja2.Environment:
    # sandboxed: a template may come from a web request (the dashboard's template_text), and
    # Jinja2 otherwise lets one reach Python's internals (``cycler.__init__.__globals__``)
    return _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=html,
        keep_trailing_newline=True,
    )


def _read_template(path: str | Path) -> str:
    shown = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise file_error(shown, exc, "a template file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{shown}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8"
        ) from None


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _parse(
    env: jinja2.Environment, source: str, label: str, *, lines: bool
) -> jinja2.nodes.Template:
    """The template's syntax tree; InputError naming ``label`` (and the line) when invalid."""
    try:
        return env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        message = _one_line(exc.message or "syntax error")
        where = f"{label}: line {exc.lineno}" if lines else label
        raise InputError(f"{where}: {message}") from None


_JINJA_DELIMITERS = ("{{", "{%", "{#")


def _absolute_pattern(pattern: str) -> str:
    """``pattern`` made absolute against the current directory, still a Jinja2 source."""
    if pattern.startswith("~"):
        pattern = os.path.expanduser(pattern)
    if os.path.isabs(pattern):
        return pattern
    base = os.path.join(os.getcwd(), "")
    if any(d in base for d in _JINJA_DELIMITERS):
        base = "{% raw %}" + base + "{% endraw %}"
    return base + pattern


def _fixed_dir(pattern: str) -> str | None:
    """The folder an absolute attachment pattern's literal beginning fixes (e.g.
    ``/srv/x/sheets`` for ``/srv/x/sheets/{{ course }}.pdf``), or None for a pattern without
    template syntax. A rendered path must stay inside it: a value such as ``../../.ssh/id_rsa``
    in a hostile CSV must not attach a file from elsewhere."""
    raw_open, raw_close = "{% raw %}", "{% endraw %}"
    literal, rest = "", pattern
    if pattern.startswith(raw_open) and raw_close in pattern:
        literal, _, rest = pattern[len(raw_open) :].partition(raw_close)
    cuts = [rest.find(d) for d in _JINJA_DELIMITERS if d in rest]
    if not cuts:
        return None
    literal += rest[: min(cuts)]
    return os.path.normpath(os.path.dirname(literal) or os.sep)


def _inside(path: str, folder: str) -> bool:
    normal = os.path.normpath(path)
    return normal == folder or normal.startswith(os.path.join(folder, ""))


def _shown_path(path: str) -> str:
    """A path as the user most likely typed it: relative when under the current directory."""
    base = os.path.join(os.getcwd(), "")
    raw_base = "{% raw %}" + base + "{% endraw %}"
    for prefix in (raw_base, base):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


DEFAULT_HEADERS: tuple[tuple[str, str], ...] = (
    ("Auto-Submitted", "auto-generated"),  # RFC 3834: not a reply, no auto-replies to it
    ("X-Auto-Response-Suppress", "OOF, AutoReply"),  # Exchange: no out-of-office replies
)
"""The headers every new job's messages carry (a --header of the same name replaces one)."""

# headers bulkmail writes itself (or has an option for), never taken from --header
RESERVED_HEADERS = frozenset(
    {
        "to",
        "from",
        "cc",
        "bcc",
        "subject",
        "message-id",
        "date",
        "reply-to",
        "sender",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "return-path",
    }
)
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but the colon


def parse_header(spec: str) -> tuple[str, str]:
    """``--header NAME:VALUE`` as (name, value): a valid field name, not one bulkmail writes
    itself (To, From, Cc, Bcc, Subject, Message-ID, Date, Reply-To, MIME's own), and a value
    that is header-safe (no CR, LF or other control character). InputError otherwise."""
    name, colon, value = spec.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name:
        raise InputError(f"--header: expected NAME:VALUE, got {spec!r}")
    if not _FIELD_NAME.fullmatch(name) or len(name) > 76:
        raise InputError(f"--header: {name!r} is not a valid header name")
    if name.lower() in RESERVED_HEADERS:
        hint = {"reply-to": " (use --reply-to)", "cc": " (use --cc)", "bcc": " (use --bcc)"}
        raise InputError(
            f"--header: {name} is set by bulkmail itself and cannot be given"
            f"{hint.get(name.lower(), '')}"
        )
    problem = header_safe_problem(value)
    if problem is not None:
        raise InputError(f"--header {name}: the value {problem}")
    if not value:
        raise InputError(f"--header {name}: empty value")
    return name, value


def message_headers(extra: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``DEFAULT_HEADERS`` with ``extra`` (checked ``--header``s) on top: one of the same
    name (case-insensitive) replaces a default; the others follow in order."""
    given = {name.lower() for name, _ in extra}
    kept = [(n, v) for n, v in DEFAULT_HEADERS if n.lower() not in given]
    return (*kept, *extra)


@dataclass(frozen=True)
class Templates:
    """The template sources of one job: what the job store keeps to render again later."""

    subject: str  # Jinja2 source of the subject (given on the command line)
    text: str  # Jinja2 source of the text body
    html: str | None  # Jinja2 source of the HTML body (autoescaped)
    attachments: tuple[str, ...]  # path patterns (Jinja2 sources), absolute
    text_name: str  # file name for messages, e.g. "examples/reminder.txt"
    html_name: str | None
    # what every message carries besides its content: (name, address) pairs and headers
    reply_to: tuple[tuple[str, str], ...] = ()
    cc: tuple[tuple[str, str], ...] = ()
    bcc: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(
        cls,
        *,
        subject: str,
        text_path: str | Path,
        html_path: str | Path | None = None,
        attach: Sequence[str] = (),
        reply_to: Sequence[str] = (),
        cc: Sequence[str] = (),
        bcc: Sequence[str] = (),
        headers: Sequence[str] = (),
    ) -> Templates:
        """Read the template files (UTF-8) and check the syntax of every template.

        Raises ``InputError`` naming the file (``--subject`` / ``--attach`` for those) and,
        for a syntax error in a file, the line. ``reply_to``, ``cc``, ``bcc``: addresses;
        ``headers``: ``NAME:VALUE`` strings (``parse_header``), on top of
        ``DEFAULT_HEADERS``.
        """
        env = _environment(html=False)
        _parse(env, subject, "--subject", lines=False)
        text = _read_template(text_path)
        _parse(env, text, str(text_path), lines=True)
        html: str | None = None
        if html_path is not None:
            html = _read_template(html_path)
            _parse(env, html, str(html_path), lines=True)
        patterns: list[str] = []
        for pattern in attach:
            if not pattern.strip():
                raise InputError("--attach: empty path")
            _parse(env, pattern, f"--attach {pattern!r}", lines=False)
            patterns.append(_absolute_pattern(pattern))
        return cls(
            subject=subject,
            text=text,
            html=html,
            attachments=tuple(patterns),
            text_name=str(text_path),
            html_name=None if html_path is None else str(html_path),
            reply_to=tuple(parse_address(a, "--reply-to") for a in reply_to),
            cc=tuple(parse_address(a, "--cc") for a in cc),
            bcc=tuple(parse_address(a, "--bcc") for a in bcc),
            headers=message_headers([parse_header(h) for h in headers]),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form a job records (the subject apart: the job has its own column)."""
        return {
            "text": self.text,
            "html": self.html,
            "attachments": list(self.attachments),
            "text_name": self.text_name,
            "html_name": self.html_name,
            "reply_to": [list(a) for a in self.reply_to],
            "cc": [list(a) for a in self.cc],
            "bcc": [list(a) for a in self.bcc],
            "headers": [list(h) for h in self.headers],
        }

    @classmethod
    def from_json(cls, subject: str, data: Mapping[str, Any]) -> Templates:
        """The templates a job recorded with ``to_json``, as they were loaded."""
        return cls(
            subject=subject,
            text=data["text"],
            html=data.get("html"),
            attachments=tuple(data.get("attachments", ())),
            text_name=data.get("text_name", "template"),
            html_name=data.get("html_name"),
            # a job made before these existed has none
            reply_to=_pairs(data.get("reply_to", ())),
            cc=_pairs(data.get("cc", ())),
            bcc=_pairs(data.get("bcc", ())),
            headers=_pairs(data.get("headers", ())),
        )


def _pairs(items: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(b)) for a, b in items)


# --------------------------------------------------------------------------- composer


_UNDEFINED = re.compile(r"'(?P<name>[^']+)' is undefined")
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


def _content_type(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


@dataclass(frozen=True)
class _Attachment:
    """One rendered attachment path, checked: ``path`` as rendered (its file name is the
    attachment's), ``real`` the file it leads to with every symbolic link followed, and
    ``folder`` the real folder it must stay in (None for a fixed path: the operator's own)."""

    path: str
    real: str
    folder: str | None


@dataclass(frozen=True)
class Rendered:
    """One recipient's message as rendered (attachments checked, not yet read)."""

    subject: str
    text: str
    html: str | None
    attachments: tuple[_Attachment, ...]

    @property
    def blank(self) -> str | None:
        """'subject', 'text body' or 'HTML body' when that renders empty (or only
        whitespace): such a message is never sent."""
        return _blank(self.subject, self.text, self.html)


def _blank(subject: str, text: str, html: str | None) -> str | None:
    if not subject.strip():
        return "subject"
    if not text.strip():
        return "text body"
    if html is not None and not html.strip():
        return "HTML body"
    return None


# names jinja2 gives a meaning of its own (``self`` at the top level; the others in macros,
# loops and blocks): never looked up in the context by the short cut
_SPECIAL_NAMES = frozenset({"self", "super", "loop", "caller", "varargs", "kwargs"})


@dataclass(frozen=True)
class _Plain:
    """A text template that is nothing but literal text and ``{{ name }}``s (the common
    subject and body), rendered without jinja2: jinja2 renders each literal part as it is
    and each name as ``str()`` of its value in the context (no autoescape, no finalize, no
    assignment that could hide a context value), which a %-format with a ``%s`` per name
    does too."""

    text: str  # the literal text ('%' doubled when there are names) with a '%s' per name
    names: tuple[str, ...]
    values: Callable[[Mapping[str, Any]], Any] | None  # itemgetter of the names, if any

    @classmethod
    def of(cls, ast: jinja2.nodes.Template) -> _Plain | None:
        """The template as a %-format, or None when it is anything more than that."""
        nodes = jinja2.nodes
        parts: list[str | nodes.Name] = []
        for node in ast.body:
            if type(node) is not nodes.Output:
                return None
            for child in node.nodes:
                if type(child) is nodes.TemplateData:
                    parts.append(child.data)
                elif (
                    type(child) is nodes.Name
                    and child.ctx == "load"
                    and child.name not in _SPECIAL_NAMES
                ):
                    parts.append(child)
                else:
                    return None
        names = tuple(p.name for p in parts if not isinstance(p, str))
        if not names:
            return cls("".join(p for p in parts if isinstance(p, str)), (), None)
        text = "".join(p.replace("%", "%%") if isinstance(p, str) else "%s" for p in parts)
        return cls(text, names, operator.itemgetter(*names))

    def render(self, context: Mapping[str, Any]) -> str:
        """The template rendered; KeyError when the context lacks a name (jinja2 then
        says how the template fails)."""
        if self.values is None:
            return self.text
        values = self.values(context)
        return self.text % (values if len(self.names) > 1 else (values,))


_Parts = tuple[str, str, str | None, tuple[_Attachment, ...]]  # a Rendered's fields


class Composer:
    """Renders one job's templates for each recipient; compiled once, reused for every row."""

    def __init__(self, templates: Templates, *, sender: str) -> None:
        self.templates = templates
        self.sender_name, self.sender_email = _parse_sender(sender)
        self.domain = self.sender_email.rpartition("@")[2]  # of the sender, checked
        text_env = _environment(html=False)
        html_env = _environment(html=True)
        self._globals = frozenset(text_env.globals)
        # the globals of every template (jinja2's defaults, the same in both environments),
        # as one plain dict: each row's context is built on top of it once and rendered by
        # every template as is (see _render)
        self._base: dict[str, Any] = dict(text_env.globals)
        if dict(html_env.globals) != self._base:
            raise AssertionError("the text and HTML environments have different globals")
        self._asts: list[jinja2.nodes.Template] = []
        self._plain: dict[jinja2.Template, _Plain] = {}  # the templates _Plain renders
        self._subject = self._compile(text_env, templates.subject, "--subject", lines=False)
        self._text = self._compile(text_env, templates.text, templates.text_name, lines=True)
        self._text_label = f"template {templates.text_name}"
        self._html: jinja2.Template | None = None
        if templates.html is not None:
            html_name = templates.html_name or "HTML template"
            self._html = self._compile(html_env, templates.html, html_name, lines=True)
        # (pattern, template, folder as written, the folder's real path): the real path is
        # taken once, so a folder replaced by a link later does not move the boundary
        self._attachments = tuple(
            (
                pattern,
                self._compile(text_env, pattern, "--attach", lines=False),
                folder,
                None if folder is None else os.path.realpath(folder),
            )
            for pattern in templates.attachments
            for folder in (_fixed_dir(pattern),)
        )

    def _compile(
        self, env: jinja2.Environment, source: str, label: str, *, lines: bool
    ) -> jinja2.Template:
        ast = _parse(env, source, label, lines=lines)
        self._asts.append(ast)
        template = env.from_string(source)
        if not env.autoescape:
            plain = _Plain.of(ast)
            if plain is not None:
                self._plain[template] = plain
        # the same globals as a plain dict instead of jinja2's ChainMap over the
        # environment's (slow to copy; the environment is this composer's own and never
        # changes): what each row's context is built on
        template.globals = self._base
        return template

    @property
    def variables(self) -> set[str]:
        """Variables the templates use and do not define (Jinja2 globals such as ``range``
        excluded): each must be a column of the source or one of ``BUILTIN_VARIABLES``."""
        found: set[str] = set()
        for ast in self._asts:
            found |= meta.find_undeclared_variables(ast)
        return found - self._globals

    @property
    def header_variables(self) -> set[str]:
        """The variables the subject and the attachment paths use: their values reach a
        header (the subject, an attachment's file name), so a line break in one skips the
        row; the other columns only reach the body."""
        env = _environment(html=False)
        found: set[str] = set()
        for source in (self.templates.subject, *self.templates.attachments):
            found |= meta.find_undeclared_variables(env.parse(source))
        return found - self._globals

    def check(self, recipient: Recipient, origin: str) -> Rendered | None:
        """Render everything ``build`` will for this recipient and return it; raise
        ``InputError`` on the first problem. ``origin`` names the source (e.g. the CSV path).
        Skipped recipients are never rendered, so they are not checked (None)."""
        if recipient.skip_reason is not None:
            return None
        return Rendered(*self._render(recipient, origin))

    def blank(self, recipient: Recipient, origin: str) -> str | None:
        """``check(recipient, origin).blank`` for a recipient that is not skipped, without
        keeping the message: what renders empty, or None; ``InputError`` as ``check``."""
        subject, text, html, _ = self._render(recipient, origin)
        return _blank(subject, text, html)

    # -- the variables the templates use, against a source's columns

    def uses(self) -> list[VariableUse]:
        """Every variable the templates read that they do not define, once per template
        part, in order (subject, text, HTML, attachment paths; by line)."""
        t = self.templates
        env = _environment(html=False)
        sources: list[tuple[str, str, str, bool]] = [("subject", "subject", t.subject, False)]
        sources.append(("text template", f"text template {t.text_name}", t.text, True))
        if t.html is not None:
            html_name = t.html_name or "HTML"
            sources.append(("HTML template", f"HTML template {html_name}", t.html, True))
        for pattern in t.attachments:
            shown = _shown_path(pattern)
            sources.append(("attachment path", f"attachment path {shown!r}", pattern, False))
        found: list[VariableUse] = []
        for part, label, source, lines in sources:
            ast = env.parse(source)
            undeclared = meta.find_undeclared_variables(ast) - self._globals
            names: _Found = {}
            _walk_uses(ast, frozenset(), names)
            for (name, column), (line, printed) in sorted(
                names.items(), key=lambda item: item[1][0]
            ):
                if name not in undeclared:
                    continue  # a loop variable, a {% set %}
                if column is not None:
                    name = f"{COLUMNS_VARIABLE}[{column!r}]"
                where = f"{label}, line {line}" if lines else label
                found.append(VariableUse(name, column, part, where, printed))
        return found

    def check_columns(self, columns: Sequence[str], origin: str) -> list[str]:
        """Check that every variable the templates use is one the source provides (a
        column, its snake_case name, a built-in, ``columns["..."]`` of a column); raise
        ``InputError`` naming the first unknown ones, where they are used and the closest
        name offered. Returns warnings: a snake_case name the templates use that several
        columns wanted (the first column has it)."""
        names = template_names(tuple(columns))
        offered = [c for c in columns if c.isidentifier()] + list(names.aliases)
        offered += [*sorted(BUILTIN_VARIABLES - set(offered)), COLUMNS_VARIABLE]
        problems: list[str] = []
        no_match = False
        warnings: list[str] = []
        for use in self.uses():
            if use.column is not None:
                if use.column in columns:
                    continue
                guess = difflib.get_close_matches(use.column, columns, n=1)
                shown = [f"{COLUMNS_VARIABLE}[{g!r}]" for g in guess]
            elif use.name in offered:
                clash = names.clashes.get(use.name)
                if clash is not None:
                    warnings.append(_clash_warning(origin, use, clash))
                continue
            else:
                shown = difflib.get_close_matches(use.name, offered, n=1)
            problem = f"template uses {use.name!r} ({use.where})"
            if shown:
                problem += f": did you mean {shown[0]!r}?"
            else:
                no_match = True
            problems.append(problem)
        if problems:
            message = f"{origin}: " + "; ".join(problems)
            if no_match:
                alias_of = {column: alias for alias, column in names.aliases.items()}
                listed = [f"{c} ({alias_of[c]})" if c in alias_of else c for c in columns]
                message += f" (the source has no such column; columns: {', '.join(listed)})"
            raise InputError(message)
        return list(dict.fromkeys(warnings))

    def _columns_of(self, use: VariableUse, columns: Sequence[str]) -> list[str]:
        """The columns a use reads: one, all of them (``columns`` itself) or none."""
        if use.column is not None:
            return [use.column] if use.column in columns else []
        if use.name == COLUMNS_VARIABLE and COLUMNS_VARIABLE not in columns:
            return list(columns)
        if use.name == "row":
            return []  # the row number, whatever the columns
        column = template_names(tuple(columns)).column(use.name, columns)
        return [] if column is None else [column]

    def header_columns(self, columns: Sequence[str]) -> set[str]:
        """The columns whose values reach a header: those the subject and the attachment
        paths read (by any name)."""
        found: set[str] = set()
        for use in self.uses():
            if use.part in ("subject", "attachment path"):
                found.update(self._columns_of(use, columns))
        return found

    def printed_columns(self, columns: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
        """column -> (the name a template prints it by, the parts that print it): the
        columns whose empty value would show as a gap in the message. ``columns`` itself
        (all of them, e.g. in a loop) and the built-ins apart from a 'name' column count
        for nothing."""
        found: dict[str, tuple[str, tuple[str, ...]]] = {}
        for use in self.uses():
            if not use.printed or (use.column is None and use.name == COLUMNS_VARIABLE):
                continue
            for column in self._columns_of(use, columns):
                if column == "email":
                    continue
                name, parts = found.get(column, (use.name, ()))
                if use.part not in parts:
                    parts = (*parts, use.part)
                found[column] = (name, parts)
        return found

    def build(self, recipient: Recipient, message_id: str, *, origin: str | None = None) -> Message:
        """The message for this recipient, attachments read from disk."""
        if recipient.skip_reason is not None:
            raise ValueError(f"row {recipient.row} is skipped: {recipient.skip_reason}")
        rendered = Rendered(*self._render(recipient, origin))
        attachments: list[Attachment] = []
        for item in rendered.attachments:
            data = _read_attachment(item, _where(origin, recipient))
            path = item.path
            attachments.append(Attachment(os.path.basename(path), _content_type(path), data))
        return Message(
            from_email=self.sender_email,
            from_name=self.sender_name,
            to_email=recipient.email,
            to_name=recipient.name,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            message_id=message_id,
            attachments=tuple(attachments),
            date=format_datetime(datetime.now(UTC)),
            headers=self.templates.headers,
            reply_to=self.templates.reply_to,
            cc=self.templates.cc,
            bcc=self.templates.bcc,
        )

    # -- rendering

    def _fill(
        self,
        template: jinja2.Template,
        context: dict[str, Any],
        origin: str | None,
        recipient: Recipient,
        label: str,
    ) -> str:
        """``_render``, by the short cut when the template is plain (``_Plain``)."""
        plain = self._plain.get(template)
        if plain is not None:
            try:
                return plain.render(context)
            except KeyError:
                pass  # jinja2 names the undefined variable
        return _render(template, context, _where(origin, recipient), label)

    def _render(self, recipient: Recipient, origin: str | None) -> _Parts:
        """What ``Rendered`` holds, as a tuple (no object for a row only checked)."""
        name, email = recipient.name, recipient.email
        if not plainly_safe(f"{name} {email}"):
            for what, value in (("name", name), ("email", email)):
                problem = header_safe_problem(value)
                if problem is not None:
                    raise InputError(f"{_where(origin, recipient)}: {what} {problem}")
        context = _context(recipient.fields, self._base)
        context["name"] = name
        context["email"] = email
        context["row"] = recipient.row
        subject = self._fill(self._subject, context, origin, recipient, "--subject")
        if not plainly_safe(subject):
            problem = header_safe_problem(subject)
            if problem is not None:
                where = _where(origin, recipient)
                raise InputError(f"{where}: subject {problem} after rendering")
        text = self._fill(self._text, context, origin, recipient, self._text_label)
        html: str | None = None
        if self._html is not None:
            label = f"template {self.templates.html_name or 'HTML'}"
            html = _render(self._html, context, _where(origin, recipient), label)
        if not self._attachments:
            return subject, text, html, ()
        where = _where(origin, recipient)
        paths: list[_Attachment] = []
        total = 0
        for pattern, template, folder, real_folder in self._attachments:
            label = f"--attach {_shown_path(pattern)!r}"
            path = self._fill(template, context, origin, recipient, label)
            item = _Attachment(path, path, None)
            if folder is not None and real_folder is not None:
                shown_folder = _shown_path(os.path.join(folder, "")) or "./"
                if not _inside(path, folder):
                    raise InputError(
                        f"{where}: {label} renders {_shown_path(path)!r}, outside the folder "
                        f"{shown_folder!r}; a value may not lead out of it"
                    )
                # every link followed (a file link, a folder link, '..' after a link)
                real = os.path.realpath(path)
                if not _inside(real, real_folder):
                    raise InputError(
                        f"{where}: {label} renders {_shown_path(path)!r}, a link to {real!r} "
                        f"outside the folder {shown_folder!r}; a link may not lead out of it"
                    )
                item = _Attachment(path, real, real_folder)
            size = _check_attachment(item, where, label)
            total += size
            paths.append(item)
        if total > MAX_ATTACHMENT_BYTES:
            raise InputError(
                f"{where}: attachments total {_megabytes(total)}, over the "
                f"{_megabytes(MAX_ATTACHMENT_BYTES)} limit per message"
            )
        return subject, text, html, tuple(paths)


def _clash_warning(origin: str, use: VariableUse, clash: tuple[str, ...]) -> str:
    kept, others = clash[0], clash[1:]
    other = ", ".join(repr(c) for c in others)
    if kept:
        meaning = f"the column {kept!r}"
    elif use.name == COLUMNS_VARIABLE:
        meaning = "the mapping of all columns"
    else:
        meaning = "the row number" if use.name == "row" else f"the recipient's {use.name}"
    return (
        f"{origin}: template uses {use.name!r} ({use.where}), which is {meaning}, not"
        f" {other}; write {COLUMNS_VARIABLE}[{others[0]!r}] for that column"
    )


def _where(origin: str | None, recipient: Recipient) -> str:
    return f"{origin}: row {recipient.row}" if origin else f"row {recipient.row}"


def _render(template: jinja2.Template, context: dict[str, Any], where: str, label: str) -> str:
    """``template.render(context)`` for a ``context`` that already holds the template's
    globals (``_context``'s ``base``): rendered as is, not copied twice per template as
    ``render`` would. A template changes only its own ``Context``'s variables (``{% set
    %}``), never the dict it was given, so one context serves every template of a row."""
    try:
        parts: list[str] = []
        size = 0
        for part in template.root_render_func(template.new_context(context, shared=True)):
            size += len(part)
            if size > MAX_RENDERED:  # a loop that would fill the server's memory
                raise InputError(f"{where}: {label} renders over {MAX_RENDERED:,} characters")
            parts.append(part)
        return "".join(parts)
    except InputError:
        raise
    except jinja2.UndefinedError as exc:
        found = _UNDEFINED.fullmatch(exc.message or "")
        if found is not None:
            name = _one_line(found.group("name"))
            raise InputError(f"{where}: {label} uses undefined variable {name!r}") from None
        raise InputError(f"{where}: {label}: {_one_line(exc.message or str(exc))}") from None
    except jinja2.TemplateError as exc:
        raise InputError(f"{where}: {label}: {_one_line(exc.message or str(exc))}") from None
    except Exception as exc:  # a filter or expression failing on this row's values
        message = f"{type(exc).__name__}: {_one_line(str(exc))}"
        raise InputError(f"{where}: {label}: {message}") from None


def _check_attachment(item: _Attachment, where: str, label: str) -> int:
    """The size of the attachment file ``item`` leads to; InputError when it cannot be
    attached."""
    path = item.path
    if not os.path.basename(path).strip():
        raise InputError(f"{where}: {label} renders no file name ({_shown_path(path)!r})")
    shown = _shown_path(path)
    problem = header_safe_problem(os.path.basename(path))
    if problem is not None:
        raise InputError(f"{where}: attachment file name {shown!r} {problem}")
    path = item.real
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{where}: attachment {shown!r} not found") from None
    except OSError as exc:
        raise _unreadable(where, shown, exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{where}: attachment {shown!r} is not a regular file")
    if info.st_size > MAX_ATTACHMENT_BYTES:
        raise InputError(
            f"{where}: attachment {shown!r} is {_megabytes(info.st_size)}, over the "
            f"{_megabytes(MAX_ATTACHMENT_BYTES)} limit"
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"{where}: attachment {shown!r} cannot be read (permission denied)")
    return info.st_size


def _read_attachment(item: _Attachment, where: str) -> bytes:
    """The content of a checked attachment, read from its real path. The file is opened
    without following a link and, where the system tells which file an open descriptor is
    (Linux ``/proc``), checked again to be inside its folder: a link swapped in after the
    check cannot lead the read elsewhere."""
    shown = _shown_path(item.path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    if item.folder is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(item.real, flags)
    except FileNotFoundError:
        raise InputError(f"{where}: attachment {shown!r} not found") from None
    except OSError as exc:
        raise _unreadable(where, shown, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{where}: attachment {shown!r} is not a regular file")
        if item.folder is not None:
            opened = _opened_path(fd) or item.real
            if not _inside(opened, item.folder):
                raise InputError(
                    f"{where}: attachment {shown!r} leads to {opened!r}, outside the folder "
                    f"{_shown_path(os.path.join(item.folder, ''))!r}; a link may not lead out of it"
                )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_ATTACHMENT_BYTES + 1)
    except OSError as exc:
        raise _unreadable(where, shown, exc) from None
    finally:
        os.close(fd)
    if len(data) > MAX_ATTACHMENT_BYTES:  # grew since it was checked
        raise InputError(
            f"{where}: attachment {shown!r} is over the {_megabytes(MAX_ATTACHMENT_BYTES)} limit"
        )
    return data


def _opened_path(fd: int) -> str | None:
    """The path of the file open as ``fd``, where the system says (Linux), else None."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _unreadable(where: str, shown: str, exc: OSError) -> InputError:
    return InputError(f"{where}: attachment {shown!r} cannot be read ({exc.strerror or exc})")


def _parse_sender(sender: str) -> tuple[str, str]:
    """(display name, ASCII address) of ``--from``; InputError when it is not a valid sender."""
    return parse_address(sender, "--from", "the sender")


def parse_address(sender: str, option: str, what: str = "the address") -> tuple[str, str]:
    """(display name, ASCII address) of an address option (``--from``, ``--reply-to``,
    ``--cc``...); InputError naming ``option`` when it is not one valid address."""
    problem = header_safe_problem(sender)
    if problem is not None:
        raise InputError(f"{option}: {what} {problem}")
    name, address = parseaddr(sender)
    # parseaddr is lenient (it drops spaces, takes the first of two addresses): the address
    # must appear as typed, and only once
    if not address or "@" not in address or sender.count("@") != 1 or address not in sender:
        raise InputError(
            f"{option}: {sender!r} is not an email address "
            "(use 'office@example.edu' or 'Course Office <office@example.edu>')"
        )
    local, _, domain = address.rpartition("@")
    # email-validator refuses special-use names, but a sender on the local machine
    # (bulkmail@localhost, the outbox default) is fine: check only its local part then
    checked = f"{local}@example.com" if domain.lower() == "localhost" else address
    try:
        info = validate_email(checked, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InputError(f"{option}: {address!r} is not a valid address: {exc}") from None
    if checked != address:
        return name.strip(), f"{info.local_part}@localhost"
    return name.strip(), info.ascii_email or info.normalized
