"""The domain's exceptions and the process exit codes: the one module that computes an
exit code, from how a job ended (``exit_code_for``) or from an error (``exit_code_of``)."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from bulkmail.store.records import JobState  # light: no SQLAlchemy

if TYPE_CHECKING:
    from bulkmail.store.records import Counts


class ExitCode(IntEnum):
    """Process exit codes, as the design fixes them."""

    OK = 0  # done with no failed delivery; dry run ok; worker started; status printed
    SOME_FAILED = 1  # job finished but some deliveries failed (or expired: --not-after)
    BAD_INPUT = 2  # bad usage or input: nothing sent, no job created
    STOPPED = 3  # job stopped before finishing (fatal provider error, too many transient)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): message in flight finished, job paused, resumable
    TERMINATED = 143  # SIGTERM (128 + SIGTERM: timeout, cron, systemd): handled as Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler the command line installs
    (``bulkmail.cli.main``): handled exactly as Ctrl-C (the message in flight is finished,
    the job paused, or this worker leaves a job other live workers go on with), exit 143."""


class BulkmailError(Exception):
    """Base of every error a user can cause or fix; printed as one line, never a traceback."""

    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(BulkmailError):
    """Bad input: a file, row, column, template variable or option value at fault."""


class ConfigError(BulkmailError):
    """Bad or missing configuration (a setting, a secret, a sender)."""


class JobNotFound(BulkmailError):
    """No job with that id in the store."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id} in the store (see `bulkmail recent`)")
        self.job_id = job_id


class JobStateError(BulkmailError):
    """The job cannot do that in its current state (e.g. resume while a live worker holds it)."""


class PreflightError(BulkmailError):
    """The pre-flight check (``bulkmail check``, and ``send-reminders`` before it creates a
    job) could not reach, secure or log in to the provider: nothing sent, no job, exit 3."""

    exit_code = ExitCode.STOPPED


class StoreError(BulkmailError):
    """The job store cannot be opened or is not a bulkmail store."""


def file_error(shown: str, exc: OSError, what: str) -> InputError:
    """The error for an input file that cannot be read: ``shown`` is the path as the user
    gave it, ``what`` what it should be ("a CSV file", "a template file")."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{shown}: no such file")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{shown}: is a directory, expected {what}")
    if isinstance(exc, PermissionError):
        return InputError(f"{shown}: cannot read (permission denied)")
    reason = exc.strerror or str(exc)
    if not reason.isprintable():  # one line, control characters escaped
        reason = repr(reason)[1:-1]
    return InputError(f"{shown}: cannot read ({reason})")


def exit_code_for(
    state: str, counts: Counts, *, interrupted: bool = False, terminated: bool = False
) -> ExitCode:
    """The exit code of a run that left the job in ``state`` with ``counts``: Ctrl-C is 130
    and SIGTERM 143 (paused, resumable); a completed job is 0, or 1 when some deliveries
    failed; anything else (paused, aborted, stalled, cancelled) stopped before finishing: 3."""
    if terminated:
        return ExitCode.TERMINATED
    if interrupted:
        return ExitCode.INTERRUPTED
    if state == JobState.COMPLETED:
        # expired deliveries (--not-after passed) were not delivered either
        return ExitCode.SOME_FAILED if counts.failed or counts.expired else ExitCode.OK
    return ExitCode.STOPPED


def exit_code_of(error: BaseException) -> ExitCode | None:
    """The exit code an error ends the process with: a domain error's own code, 130 for
    Ctrl-C, 143 for SIGTERM; None for anything else (a bug: it propagates with its
    traceback)."""
    if isinstance(error, BulkmailError):
        return error.exit_code
    if isinstance(error, Terminated):
        return ExitCode.TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return None
