"""The terminal a command runs in, as one object the commands get from ``environment()``.

Every command reads its consoles and terminal facts (is stdin a terminal, is stderr one)
and asks its questions through an ``Environment``, never through ``sys`` or ``typer``
directly (httpie's ``Environment`` does the same). Tests install their own with ``use()``:
a Rich console that says it is a terminal shows the live bar and the confirmation prompt
is asked, all without a pseudo-terminal.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import typer
from rich.console import Console


@dataclass
class Environment:
    """``stdout``: results (panels, tables, JSON, CSV); ``stderr``: progress, questions,
    notes and errors; ``stdin_isatty``: whether a person can answer a question."""

    stdout: Console
    stderr: Console
    stdin_isatty: bool

    @classmethod
    def from_process(cls) -> Environment:
        """This process's terminal (or pipes and files) as it is now."""
        return cls(
            stdout=_console(stderr=False),
            stderr=_console(stderr=True),
            stdin_isatty=sys.stdin.isatty(),
        )

    @property
    def stdout_is_terminal(self) -> bool:
        return self.stdout.is_terminal

    @property
    def stderr_is_terminal(self) -> bool:
        """A terminal on stderr gets the live progress bar; anything else plain lines, and
        so does a terminal that cannot move its cursor (``TERM=dumb``: Emacs shells)."""
        return self.stderr.is_terminal and not self.stderr.is_dumb_terminal

    def write(self, text: str) -> None:
        """``text`` on stdout as it is (JSON, CSV, a worker's log lines): no wrapping, no
        styles, flushed at once."""
        out = self.stdout.file
        out.write(text)
        out.flush()

    def note(self, text: str) -> None:
        """One plain line on stderr (text from users and servers is never read as markup)."""
        self.stderr.print(text, markup=False, highlight=False)

    def confirm(self, question: str) -> bool:
        """Ask a yes/no question on stderr (default: no); the answer is read from stdin.
        Ctrl-C (or SIGTERM) while asking raises it (exit 130 or 143), not typer's Abort."""
        if _real_terminal(sys.stdin):
            return _ask_on_terminal(question)
        with _interrupt_passes():
            return typer.confirm(question, default=False, err=True)

    def prompt(self, question: str) -> str:
        """Ask for a line of text on stderr; the answer is read from stdin."""
        with _interrupt_passes():
            return str(typer.prompt(question, err=True))


OFF_TERMINAL_WIDTH = 10_000
"""The width of a console that is not a terminal (a pipe, a file, cron's mail): wide
enough that no line is wrapped or cut (an address, a ``bulkmail resume 2`` hint)."""


def _console(*, stderr: bool) -> Console:
    """A console on stdout or stderr: a terminal's own width; off a terminal no wrapping
    (``soft_wrap``) and a width no line reaches, whatever ``COLUMNS`` says."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=OFF_TERMINAL_WIDTH)


@contextmanager
def _interrupt_passes() -> Iterator[None]:
    """Let a KeyboardInterrupt (Ctrl-C, or ``Terminated``) out of a prompt: typer (its own
    copy of click, or click itself in older releases, whose ``Abort`` typer re-exports) turns
    it into ``Abort`` (printed "Aborted!", exit 1), keeping it as the exception's context.
    No direct ``import click``: recent typer releases do not install click."""
    try:
        yield
    except typer.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise


_installed: Environment | None = None


def environment() -> Environment:
    """The environment of the command being run: the one installed with ``use()``, else
    this process's terminal."""
    return _installed if _installed is not None else Environment.from_process()


@contextmanager
def use(env: Environment) -> Iterator[Environment]:
    """Run the commands inside the ``with`` block in ``env`` (tests)."""
    global _installed
    previous, _installed = _installed, env
    try:
        yield env
    finally:
        _installed = previous


def _real_terminal(stream: object) -> bool:
    try:
        return os.isatty(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # a test's stream, a closed descriptor


def _ask_on_terminal(question: str) -> bool:
    """``question [y/N]:`` on stderr, the answer read from the terminal on stdin. The wait
    is ``select`` with a short timeout, never a bare blocking read: a signal (Ctrl-C,
    SIGTERM) that lands just before a read would otherwise only be acted on after the next
    key press, as happens with ``input()``; here its handler runs within a quarter second
    and the question ends with the interrupt (exit 130 or 143)."""
    while True:
        sys.stderr.write(f"{question} [y/N]: ")
        sys.stderr.flush()
        while not select.select([sys.stdin], [], [], 0.25)[0]:
            pass  # the signal handlers run between two waits
        line = sys.stdin.readline()
        if not line:  # end of input: as typer does, nothing is confirmed
            sys.stderr.write("\n")
            raise typer.Abort()
        answer = line.strip().lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("", "n", "no"):
            return False
        sys.stderr.write("Error: invalid input\n")
