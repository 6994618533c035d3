"""The outbox transport: each message becomes an ``.eml`` file in a folder.

It is the default when nothing else is configured, so a fresh install can run a whole job
and the result can be opened in any mail client. The file name comes from the Message-ID,
so sending the same message again (a retry, a resumed job) replaces its file instead of
adding a duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

from bulkmail.mime import to_bytes_fast
from bulkmail.models import Message
from bulkmail.providers.base import FatalError
from bulkmail.providers.settings import OutboxSettings

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")
_MAX_STEM = 150  # well below the usual 255-byte file name limit


class OutboxProvider:
    """Writes messages into ``settings.dir`` (or ``default_dir``), created with mode 0700."""

    name = "outbox"

    def __init__(self, settings: OutboxSettings, *, default_dir: Path) -> None:
        self.directory = Path(settings.dir).expanduser() if settings.dir else default_dir

    def send(self, message: Message) -> str | None:
        data = to_bytes_fast(message)
        name = eml_name(message.message_id)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomically(self.directory, name, data)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise FatalError(
                f"cannot write to the outbox folder {self.directory}: {reason}"
            ) from None
        return name

    def connect(self) -> None:
        """Nothing to open: each message is a file."""

    def close(self) -> None:
        """Nothing to release: each message is written and closed at once."""


def eml_name(message_id: str) -> str:
    """A safe file name for a Message-ID: "<a.b@host>" -> "a.b@host.eml".

    When characters had to be replaced (or the id was cut short), a hash of the whole id is
    appended so that two different ids never share a file.
    """
    raw = message_id.strip().removeprefix("<").removesuffix(">")
    stem = _UNSAFE.sub("_", raw).lstrip(".")
    if stem != raw or len(stem) > _MAX_STEM or not stem:
        digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = f"{stem[:_MAX_STEM]}-{digest}" if stem else digest
    return f"{stem}.eml"


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over the target, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def check(settings: OutboxSettings, default_dir: Path) -> str:
    """The pre-flight check, creating nothing: a file can be written into the folder and
    removed again, or, when the folder does not exist yet, its nearest existing parent is a
    folder this process may create it in. ``PreflightError`` (exit 3) naming the folder."""
    from bulkmail.errors import PreflightError

    directory = Path(settings.dir).expanduser() if settings.dir else default_dir
    if not directory.exists():
        parent = directory.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise PreflightError(
                f"outbox {directory}: cannot be created ({parent} is not a writable folder)"
            )
        return f"outbox {directory} (to be created)"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".check-", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PreflightError(f"outbox {directory}: not writable ({reason})") from None
    return f"outbox {directory} (writable)"
