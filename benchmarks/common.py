"""Shared pieces of the benchmarks: the run context, timed subprocesses, SMTP sinks in their
own processes, bulkmail and mailmerge runners, CSV generation and the result tables.

Everything a benchmark writes goes into the run's temporary directory (sink records into
/dev/shm when it exists, so the sink's per-message fsync costs nothing); nothing is written
into the repository.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import random
import selectors
import shutil
import signal
import socket
import sqlite3
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
TEMPLATE = EXAMPLES / "reminder.txt"
SUBJECT = "Reminder: {{ course }} grades due {{ due_date }}"
SENDER = "Course Office <office@example.edu>"
HOST = "127.0.0.1"

MAILMERGE_VERSION = "2.3.0"  # the latest 2.x on PyPI ("2.3" in the issue)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every benchmark gets: sizes, switches and where to put files."""

    quick: bool
    workdir: Path  # removed at the end of the run (unless --keep)
    fastdir: Path  # tmpfs when available: sink records
    cache_dir: Path  # survives runs: the mailmerge venv
    mailmerge: bool = True
    python: str = sys.executable
    verbose: bool = False
    _mailmerge_cmd: Path | None = None
    _mailmerge_checked: bool = False
    _mailmerge_why: str = ""
    _counter: int = 0

    @property
    def bulkmail(self) -> Path:
        return Path(self.python).parent / "bulkmail"

    def log(self, message: str) -> None:
        print(f"  . {message}", file=sys.stderr, flush=True)

    def fresh_dir(self, name: str) -> Path:
        """A new, empty directory under the run's work directory."""
        self._counter += 1
        path = self.workdir / f"{self._counter:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def mailmerge_command(self) -> Path | None:
        """The ``mailmerge`` script of a private venv (created once, cached), or None."""
        if not self._mailmerge_checked:
            self._mailmerge_checked = True
            if not self.mailmerge:
                self._mailmerge_why = "disabled (--no-mailmerge)"
            else:
                self._mailmerge_cmd, self._mailmerge_why = ensure_mailmerge(self)
        return self._mailmerge_cmd

    @property
    def mailmerge_skip_reason(self) -> str:
        return f"skipped: mailmerge unavailable ({self._mailmerge_why})"


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of a benchmark's table."""

    label: str
    measured: str
    ratio: str = ""  # "1.23x bare smtplib"
    target: str = ""  # ">= 0.90x bare smtplib"
    verdict: str = ""  # PASS | MISS | skipped | FAILED (could not run) | "" (information only)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def misses(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "MISS"]

    @property
    def failures(self) -> list[Row]:
        """Rows whose measurement could not run (the other rows still did)."""
        return [r for r in self.rows if r.verdict == FAILED]

    def add_failure(self, label: str, error: BaseException) -> None:
        """Record that one part of the benchmark could not run: its row says why, in short
        (the whole message goes to stderr and into the row's data)."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        short = lines[0] if lines else type(error).__name__
        if len(short) > 100:
            short = short[:97] + "..."
        print(f"  ! {label} could not run: {error}", file=sys.stderr, flush=True)
        self.add(Row(label, f"could not run: {short}", verdict=FAILED, data={"error": str(error)}))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FAILED = "FAILED"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_result(result: Result) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 132, no_color=not tty, highlight=False)
    console.print(f"\n== {result.name}: {result.title} ==", markup=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("measurement", overflow="fold")
    table.add_column("measured", justify="right")
    table.add_column("vs reference", justify="right")
    table.add_column("target")
    table.add_column("result")
    styles = {"PASS": "green", "MISS": "bold red", FAILED: "bold red", "skipped": "yellow"}
    for row in result.rows:
        cells = (row.label, row.measured, row.ratio, row.target)
        table.add_row(*(Text(c) for c in cells), Text(row.verdict, styles.get(row.verdict, "")))
    console.print(table)
    for note in result.notes:
        console.print(f"  note: {note}", markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- numbers


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def fmt_mb(kib: int) -> str:
    return f"{kib / 1024:.0f} MB"


def ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("inf")


def max_in_window(times: Sequence[float], width: float) -> int:
    """The largest number of events in any half-open window [s, s + width)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width:
            start += 1
        best = max(best, end - start + 1)
    return best


def jitter_needed(times: Sequence[float], rate: float, burst: int) -> float:
    """The least receive-time noise (seconds) that explains every window: the largest
    ``(count - burst) / rate - span`` over all windows [t_i, t_j]. Zero means no window of
    any length held more than ``rate * t + burst`` sends as received."""
    ordered = sorted(times)
    worst = 0.0
    for i in range(len(ordered)):
        for j in range(i + burst, len(ordered)):
            count = j - i + 1
            worst = max(worst, (count - burst) / rate - (ordered[j] - ordered[i]))
    return worst


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    argv: list[str]
    returncode: int
    wall: float  # seconds from just before the fork to the reaped exit
    maxrss_kib: int  # the child's peak resident set size
    stdout: str
    stderr: str

    def check(self, what: str, ok_codes: Iterable[int] = (0,)) -> Proc:
        if self.returncode not in tuple(ok_codes):
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise BenchmarkError(f"{what} exited {self.returncode}: {self.argv}\n{tail}")
        return self


class BenchmarkError(RuntimeError):
    """A benchmark could not run (a tool failed, a sink did not start)."""


def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900.0,
) -> Proc:
    """Run a command to completion with stdin closed and its output in files, timing it from
    just before the fork to the reaped exit; its peak RSS comes from wait4()."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Proc(
            argv=list(argv),
            returncode=proc.returncode,
            wall=wall,
            maxrss_kib=int(usage.ru_maxrss),
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )


def clean_env(
    home: Path, extra: Mapping[str, str] | None = None, *, bytecode: bool = True
) -> dict[str, str]:
    """The environment of a user with their own HOME and XDG dirs and no BULKMAIL_* set.
    ``bytecode=False`` keeps the process from writing __pycache__ (for code run from the
    checkout's tests/); measured processes cache bytecode as a user's install does.
    PYTHONPATH is kept: with it set, the checkout it names is the one measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKMAIL_")}
    for key in ("PYTHONSTARTUP", "COVERAGE_PROCESS_START"):
        env.pop(key, None)
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        COLUMNS="100",
    )
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- sinks


class Sink(Protocol):
    label: str
    port: int

    def reset(self) -> None: ...

    def count(self) -> int: ...

    def times(self) -> list[float]: ...

    def death(self) -> str | None: ...


class _SinkProcess:
    """What both sinks share: a server process of their own with its stderr in a file, and a
    scratch folder, both gone when the ``with`` block ends."""

    label: str
    dir: Path
    _proc: subprocess.Popen[bytes] | None

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def _stderr_path(self) -> Path:
        return self.dir / "stderr.txt"

    def _stderr_tail(self) -> str:
        try:
            text = self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-10:])

    def death(self) -> str | None:
        """Why the server process is gone (None while it runs): what a failed measurement
        against it reports, since the client only sees a reset connection."""
        if self._proc is None or self._proc.poll() is None:
            return None
        return f"{self.label} exited {self._proc.returncode}: {self._stderr_tail()}".strip()


class AiosmtpdSink(_SinkProcess):
    """``python -m tests.smtp_sink`` in its own process (so its CPU does not share the GIL of
    the process measured), recording one JSON line per message with its receive time."""

    label = "aiosmtpd sink"

    def __init__(self, ctx: Context, *, delay: float = 0.0) -> None:
        self.ctx = ctx
        self.delay = delay
        self.dir = Path(tempfile.mkdtemp(prefix="sink-", dir=ctx.fastdir))
        self.record = self.dir / "received.jsonl"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AiosmtpdSink:
        argv = [self.ctx.python, "-m", "tests.smtp_sink", "--port", "0"]
        argv += ["--record", str(self.record), "--delay", str(self.delay)]
        env = clean_env(self.dir / "home", bytecode=False)
        with open(self._stderr_path, "wb") as errlog:
            self._proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errlog,
            )
        line = _read_line(self._proc, timeout=20.0)
        if not line.startswith("ready "):
            err = self._stderr_tail()
            self.__exit__(None, None, None)
            raise BenchmarkError(f"the SMTP sink did not start: {line!r}\n{err}")
        self.port = int(line.split()[1])
        self.reset()
        return self

    def reset(self) -> None:
        self.record.write_bytes(b"")

    def _lines(self) -> list[dict[str, Any]]:
        try:
            text = self.record.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def count(self) -> int:
        return len(self._lines())

    def times(self) -> list[float]:
        return sorted(float(line["time"]) for line in self._lines())


class PostfixSink(_SinkProcess):
    """Postfix's ``smtp-sink`` (a fast C server), dumping every message into one file.

    Run as root, smtp-sink must drop to another user (``-u nobody``) before it opens the dump
    file, so the dump then lives in a folder of its own owned by that user, made where every
    user can reach it (the run's own folders are private to us). As any other user it runs as
    us, in the run's fast folder."""

    label = "postfix smtp-sink"
    USER = "nobody"

    def __init__(self, ctx: Context, program: str) -> None:
        self.ctx = ctx
        self.program = program
        self.user: str | None = self.USER if os.geteuid() == 0 else None
        if self.user is None:
            self.dir = Path(tempfile.mkdtemp(prefix="psink-", dir=ctx.fastdir))
        else:
            self.dir = _dir_for_user(self.user, [ctx.fastdir.parent, Path(tempfile.gettempdir())])
        self.dump = self.dir / "dump.txt"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def find() -> str | None:
        found = shutil.which("smtp-sink")
        if found:
            return found
        for candidate in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink"):
            if os.access(candidate, os.X_OK):
                return candidate
        return None

    def __enter__(self) -> PostfixSink:
        self.dump.touch(mode=0o600)
        if self.user is not None:
            _give_to(self.dump, self.user)
        self.port = free_port()
        argv = [self.program, "-D", str(self.dump)]
        if self.user is not None:
            argv += ["-u", self.user]
        argv += [f"{HOST}:{self.port}", "256"]
        with open(self._stderr_path, "wb") as errlog:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                why = self.death()
                self.__exit__(None, None, None)
                raise BenchmarkError(f"smtp-sink exited at once: {why}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.recv(512)  # the greeting
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.__exit__(None, None, None)
            raise BenchmarkError("smtp-sink did not start listening")
        self._check_dump()
        return self

    def _check_dump(self) -> None:
        """One message through the sink, so a dump file it cannot write fails here, with
        smtp-sink's own words, rather than as a reset connection in the middle of a run."""
        import smtplib

        try:
            with smtplib.SMTP(HOST, self.port, timeout=10) as smtp:
                smtp.sendmail(
                    "probe@example.edu", ["probe@example.edu"], b"Subject: probe\r\n\r\nprobe\r\n"
                )
        except (OSError, smtplib.SMTPException) as exc:
            time.sleep(0.1)  # let a dying sink finish writing its reason
            raise BenchmarkError(
                f"smtp-sink failed a probe message ({exc}): {self.death()}"
            ) from None
        deadline = time.monotonic() + 5
        while self.count() < 1:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"smtp-sink did not dump a probe message: {self.death()}")
            time.sleep(0.02)
        self.reset()

    def reset(self) -> None:
        with open(self.dump, "w"):
            pass

    def count(self) -> int:
        # every dumped transaction starts with the sink's own X-Client-Addr header
        with open(self.dump, "rb") as f:
            return sum(1 for line in f if line.startswith(b"X-Client-Addr:"))

    def times(self) -> list[float]:
        return []


def _searchable_by_all(folder: Path) -> bool:
    """Every folder on the way to ``folder`` (and it) can be passed through by any user."""
    path = folder.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _dir_for_user(user: str, candidates: Sequence[Path]) -> Path:
    """A new folder owned by ``user`` (mode 0700), in the first candidate any user can reach."""
    for parent in candidates:
        try:
            if not (parent.is_dir() and _searchable_by_all(parent)):
                continue
            made = Path(tempfile.mkdtemp(prefix="bulkmail-psink-", dir=parent))
        except OSError:
            continue
        try:
            _give_to(made, user)
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)
            raise
        return made
    where = ", ".join(str(p) for p in candidates)
    raise BenchmarkError(f"no folder that user {user!r} can reach for the dump file ({where})")


def _give_to(path: Path, user: str) -> None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise BenchmarkError(f"there is no user {user!r} for smtp-sink -u") from None
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _read_line(proc: subprocess.Popen[bytes], *, timeout: float) -> str:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            data += chunk
    finally:
        selector.close()
    return data.decode(errors="replace").strip()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# --------------------------------------------------------------------------- inputs

_FIRST = [
    "Ada",
    "Ben",
    "Chloe",
    "Dmitri",
    "Esther",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Lars",
    "Mei",
    "Nils",
    "Olu",
]
_LAST = [
    "Whitfield",
    "Okafor",
    "Novak",
    "Tanaka",
    "Moreau",
    "Haddad",
    "Lindqvist",
    "Rossi",
    "Mensah",
    "Kowalski",
]
_COURSES = [
    ("CS101", "Introduction to Programming"),
    ("CS220", "Data Structures"),
    ("MA115", "Linear Algebra"),
    ("PH210", "Thermodynamics"),
    ("BI150", "Cell Biology"),
]


def write_csv(path: Path, rows: int, *, seed: int = 7) -> Path:
    """A realistic recipients CSV: name, email, course, course_title, due_date."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "email", "course", "course_title", "due_date"])
        for i in range(rows):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            course, title = rng.choice(_COURSES)
            email = f"{first}.{last}.{i}@example.edu".lower()
            writer.writerow([f"{first} {last}", email, course, title, f"2025-09-{1 + i % 28:02d}"])
    return path


# --------------------------------------------------------------------------- bulkmail


@dataclass
class SendRun:
    proc: Proc
    job: dict[str, Any]  # the --json job document
    started_at: float | None  # from the store, POSIX seconds
    finished_at: float | None
    created_at: float | None
    states: dict[str, int]  # deliveries per state, read from the store afterwards

    @property
    def job_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def bulkmail_send(
    ctx: Context,
    csv_path: Path,
    sink: Sink,
    *,
    name: str,
    concurrency: int = 1,
    rate: float = 0,
    burst: int = 1,
    extra: Sequence[str] = (),
) -> SendRun:
    """``bulkmail send-reminders`` as a user runs it: the installed script, its own HOME and
    store, SMTP settings from the environment, ``--yes --json``."""
    where = ctx.fresh_dir(name)
    store = where / "bulkmail.db"
    env = clean_env(
        where / "home",
        {
            "BULKMAIL_SMTP_HOST": HOST,
            "BULKMAIL_SMTP_PORT": str(sink.port),
            "BULKMAIL_SMTP_SECURITY": "none",
        },
    )
    argv = [str(ctx.bulkmail), "send-reminders", "--csv", str(csv_path)]
    argv += ["--template", str(TEMPLATE), "--subject", SUBJECT, "--provider", "smtp"]
    argv += ["--from", SENDER, "--yes", "--json", "--store", str(store)]
    argv += ["--rate", f"{rate:g}", "--burst", str(burst), "--concurrency", str(concurrency)]
    argv += list(extra)
    proc = run_process(argv, env=env, cwd=where).check(f"bulkmail ({name})")
    job = json.loads(proc.stdout)
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        created, started, finished = db.execute(
            "SELECT created_at, started_at, finished_at FROM jobs WHERE id = ?", (job["id"],)
        ).fetchone()
        states = dict(
            db.execute(
                "SELECT state, count(*) FROM deliveries WHERE job_id = ? GROUP BY state",
                (job["id"],),
            ).fetchall()
        )
    db.close()
    return SendRun(proc, job, started, finished, created, states)


# --------------------------------------------------------------------------- mailmerge

MAILMERGE_TEMPLATE_HEAD = """TO: {{ name }} <{{ email }}>
SUBJECT: Reminder: {{ course }} grades due {{ due_date }}
FROM: Course Office <office@example.edu>

"""


def ensure_mailmerge(ctx: Context) -> tuple[Path | None, str]:
    """Create (once) a venv with mailmerge under the cache dir; return its script."""
    venv = ctx.cache_dir / f"mailmerge-{MAILMERGE_VERSION}-venv"
    script = venv / "bin" / "mailmerge"
    marker = venv / ".installed"
    if marker.exists() and script.exists():
        return script, ""
    ctx.log(f"installing mailmerge=={MAILMERGE_VERSION} into {venv} (once)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    made = run_process([ctx.python, "-m", "venv", str(venv)], timeout=300)
    if made.returncode != 0:
        return None, f"python -m venv failed: {made.stderr.strip()[-200:]}"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    pip += ["--disable-pip-version-check", f"mailmerge=={MAILMERGE_VERSION}"]
    installed = run_process(pip, timeout=600)
    if installed.returncode != 0 or not script.exists():
        last = [ln for ln in installed.stderr.strip().splitlines() if "WARNING" not in ln]
        return None, f"pip install failed: {' '.join(last[-2:])[-300:]}"
    marker.write_text(MAILMERGE_VERSION)
    return script, ""


def mailmerge_send(ctx: Context, csv_path: Path, sink: Sink, *, name: str) -> Proc | None:
    """mailmerge on the same list to the same sink (None when mailmerge is unavailable)."""
    script = ctx.mailmerge_command()
    if script is None:
        return None
    where = ctx.fresh_dir(name)
    template = where / "mailmerge_template.txt"
    template.write_text(MAILMERGE_TEMPLATE_HEAD + TEMPLATE.read_text(encoding="utf-8"))
    config = where / "mailmerge_server.conf"
    # no "security" key: mailmerge then talks plain SMTP without login (sendmail_clear)
    config.write_text(f"[smtp_server]\nhost = {HOST}\nport = {sink.port}\nratelimit = 0\n")
    argv = [str(script), "--no-dry-run", "--no-limit", "--output-format", "raw"]
    argv += ["--template", str(template), "--database", str(csv_path), "--config", str(config)]
    return run_process(argv, env=clean_env(where / "home"), cwd=where).check("mailmerge")


# --------------------------------------------------------------------------- helpers


def timed_repeats(
    commands: Mapping[str, Callable[[], Proc]], repeats: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each command ``repeats`` times, interleaved (so drift hits all alike), after
    ``warmup`` untimed rounds; returns the wall times per command."""
    for _ in range(warmup):
        for run in commands.values():
            run()
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, run in commands.items():
            walls[name].append(run().wall)
    return walls
