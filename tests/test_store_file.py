"""A store that vanished or was truncated is never silently a new one (issue 10): only
`send-reminders` creates a store, and says so; every other command on a missing store, a
0-byte file or an SQLite database without bulkmail's tables exits 2 naming the path and
creates nothing; `--dedupe-key` refuses a store that does not exist yet unless
`--new-store`; a read-only store still serves `status`, `recent` and `report`. Through the
real CLI, on real files (and the PostgreSQL test cluster)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bulkmail.cli import app
from bulkmail.store import open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HINT = "(a mistyped --store or BULKMAIL_STORE?)"
SEND = ["send-reminders", "--yes", "--csv", str(EXAMPLES / "instructors.csv"),
        "--template", str(EXAMPLES / "reminder.txt"), "--subject", "Reminder: {{ course }}",
        "--from", "office@example.edu", "--rate", "0"]  # fmt: skip
# every command but send-reminders, with the arguments it needs
OTHERS = [
    ["status", "1"],
    ["recent"],
    ["report", "1"],
    ["resume", "1"],
    ["retry", "1"],
    ["cancel", "1"],
    ["worker", "1"],
]


def bulkmail(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def sent_messages() -> int:
    """How many messages the outbox provider (the default) has written."""
    outbox = Path(os.environ["XDG_DATA_HOME"]) / "bulkmail" / "outbox"
    return len(list(outbox.glob("*.eml"))) if outbox.exists() else 0


def one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line: str = lines[0]
    return line


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def make_store_with_a_job(path: Path) -> None:
    """A store with one job of 12 sent, made by a `bulkmail` process that has ended (so
    no connection of this process holds it open)."""
    done = subprocess.run(
        [sys.executable, "-m", "bulkmail", *SEND, "--store", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# -- only send-reminders creates a store, and says so


def test_send_reminders_creates_a_new_store_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "jobs.db"
    first = bulkmail(*SEND, "--store", str(path))
    assert first.exit_code == 0, first.output
    assert f"bulkmail: new job store at {path}\n" in first.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [n for n in files_in(path.parent) if n.endswith(".new")]  # no temporary left
    again = bulkmail(*SEND, "--store", str(path))
    assert again.exit_code == 0, again.output
    assert "new job store" not in again.stderr
    assert sent_messages() == 24
    recent = bulkmail("recent", "--json", "--store", str(path))
    assert [d["id"] for d in json.loads(recent.stdout)] == [2, 1]


def test_the_default_store_is_created_by_send_reminders_only(tmp_path: Path) -> None:
    default = Path(os.environ["XDG_DATA_HOME"]) / "bulkmail" / "bulkmail.db"
    refused = bulkmail("recent")
    assert refused.exit_code == 2
    assert one_line(refused) == f"bulkmail: no job store at {default} {HINT}"
    assert not default.parent.exists()
    sent = bulkmail(*SEND)
    assert sent.exit_code == 0, sent.output
    assert f"bulkmail: new job store at {default}" in sent.stderr
    assert bulkmail("recent").exit_code == 0


@pytest.mark.parametrize("command", OTHERS, ids=lambda c: c[0])
def test_other_commands_on_a_missing_store_exit_2_and_create_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "typo" / "jobs.db"
    result = bulkmail(*command, "--store", str(path))
    assert result.exit_code == 2, result.output
    assert one_line(result) == f"bulkmail: no job store at {path} {HINT}"
    assert not path.parent.exists()  # not the file, not the folder


def test_a_mistyped_bulkmail_store_in_the_environment_is_named(tmp_path: Path) -> None:
    real = tmp_path / "jobs.db"
    make_store_with_a_job(real)
    typo = tmp_path / "jbos.db"
    for command in (["status", "1"], ["resume", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "bulkmail", *command],
            env={**os.environ, "BULKMAIL_STORE": str(typo)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"bulkmail: no job store at {typo} {HINT}"
    assert not typo.exists()


# -- a truncated (0-byte) store, an SQLite database without bulkmail's tables


@pytest.mark.parametrize("command", OTHERS, ids=lambda c: c[0])
def test_other_commands_on_an_empty_file_exit_2(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "jobs.db"
    path.touch()
    result = bulkmail(*command, "--store", str(path))
    assert result.exit_code == 2, result.output
    assert one_line(result) == (
        f"bulkmail: no job store at {path}: the file is empty (0 bytes) {HINT}"
    )
    assert path.stat().st_size == 0
    assert files_in(tmp_path) == ["home", "jobs.db"]  # no -wal, no -shm


def test_a_truncated_store_is_not_made_a_new_one_by_send_reminders(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    make_store_with_a_job(path)
    sent = sent_messages()
    path.write_bytes(b"")  # truncated (a full disk, a bad copy)
    for extra in ([], ["--new-store"], ["--dedupe-key", "autumn", "--new-store"]):
        result = bulkmail(*SEND, "--store", str(path), *extra)
        assert result.exit_code == 2, result.output
        assert one_line(result) == (
            f"bulkmail: {path} is empty (0 bytes): not a job store; remove it to start a new store"
        )
        assert path.stat().st_size == 0
    assert sent_messages() == sent  # nothing sent
    path.unlink()  # as the message says
    again = bulkmail(*SEND, "--store", str(path))
    assert again.exit_code == 0 and "new job store" in again.stderr


@pytest.mark.parametrize("command", OTHERS, ids=lambda c: c[0])
def test_other_commands_on_an_sqlite_file_without_tables_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 7")  # a valid SQLite file, no table at all
    conn.close()
    before = path.read_bytes()
    result = bulkmail(*command, "--store", str(path))
    assert result.exit_code == 2, result.output
    assert one_line(result) == (
        f"bulkmail: no job store at {path}: an SQLite database without bulkmail's tables {HINT}"
    )
    assert path.read_bytes() == before


def test_send_reminders_refuses_an_sqlite_file_without_tables(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = path.read_bytes()
    result = bulkmail(*SEND, "--store", str(path), "--new-store")
    assert result.exit_code == 2, result.output
    assert "without bulkmail's tables: not a job store; remove it" in one_line(result)
    assert path.read_bytes() == before and sent_messages() == 0


# -- --dedupe-key needs the store's history


def test_dedupe_key_on_a_new_store_needs_new_store(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "jobs.db"
    cron = [*SEND, "--store", str(path), "--dedupe-key", "autumn"]
    for extra in ([], ["--dry-run"], ["--dry-run", "--json"]):
        refused = bulkmail(*cron, *extra)
        assert refused.exit_code == 2, refused.output
        line = one_line(refused)
        assert line.startswith(f"bulkmail: no job store at {path}, so --dedupe-key 'autumn'")
        assert "everyone would be reminded again; pass --new-store to start a new store" in line
        assert not path.parent.exists() and sent_messages() == 0
    dry = bulkmail(*cron, "--dry-run", "--json", "--new-store")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["pending"] == 12
    assert not path.parent.exists()  # a dry run creates nothing
    first = bulkmail(*cron, "--new-store")
    assert first.exit_code == 0, first.output
    assert f"bulkmail: new job store at {path}" in first.stderr
    assert sent_messages() == 12
    second = bulkmail(*cron, "--json")  # the next cron run: the store exists now
    assert second.exit_code == 0, second.output
    doc = json.loads(second.stdout)
    # everyone already reminded under the key: no job at all (issue 14)
    assert (doc["id"], doc["already_reminded"], doc["dedupe_key"]) == (None, 12, "autumn")
    assert bulkmail(*cron, "--new-store").exit_code == 0  # harmless on an existing store
    assert sent_messages() == 12
    assert [
        d["id"] for d in json.loads(bulkmail("recent", "--json", "--store", str(path)).stdout)
    ] == [1]


def test_postgresql_store_without_schema(pg_url: str) -> None:
    shown = sa.make_url(pg_url).render_as_string(hide_password=True)
    cron = [*SEND, "--store", pg_url, "--dedupe-key", "autumn"]

    def tables() -> list[str]:
        engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect() as conn:
                return sorted(sa.inspect(conn).get_table_names())
        finally:
            engine.dispose()

    for command in OTHERS:
        result = bulkmail(*command, "--store", pg_url)
        assert result.exit_code == 2, result.output
        assert one_line(result) == (
            f"bulkmail: no job store at {shown}: no bulkmail tables there {HINT}"
        )
    refused = bulkmail(*cron)
    assert refused.exit_code == 2, refused.output
    assert "pass --new-store to start a new store" in one_line(refused)
    assert tables() == [] and sent_messages() == 0
    first = bulkmail(*cron, "--new-store")
    assert first.exit_code == 0, first.output
    assert f"bulkmail: new job store at {shown}" in first.stderr
    assert "jobs" in tables()
    second = bulkmail(*cron, "--json")
    assert second.exit_code == 0, second.output
    assert "new job store" not in second.stderr
    doc = json.loads(second.stdout)
    assert (doc["id"], doc["already_reminded"]) == (None, 12)  # no second job (issue 14)
    assert len(json.loads(bulkmail("recent", "--json", "--store", pg_url).stdout)) == 1


# -- creating a store


def test_processes_creating_one_new_store_at_once_share_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    created: list[bool] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            store = open_store(path)
            created.append(store.created)
            store.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(created) == [False] * 5 + [True]
    assert files_in(tmp_path) == ["home", "jobs.db"]


# -- a read-only store still serves status, recent and report


def _read_only(folder: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``folder`` read-only: its file 0400 and the folder 0500, and,
    as root (whom file modes do not bind), a read-only bind mount of the folder too, so
    SQLite really cannot create its WAL index there."""
    for p in folder.iterdir():
        p.chmod(0o400)
    folder.chmod(0o500)
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        command = [unshare, "-m", "sh", "-c", script, str(folder), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_read_only_store_serves_status_recent_and_report(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "jobs.db"
    make_store_with_a_job(path)
    assert files_in(folder) == ["jobs.db"]  # no -wal: every commit is in the file
    probe = _read_only(folder, ["touch", str(folder / "x")])
    if os.geteuid() == 0 and "Read-only file system" not in probe.stderr:
        pytest.skip(f"running as root, and no read-only mount here: {probe.stderr.strip()}")
    assert probe.returncode != 0, "the folder is not read-only"
    bulkmail_cmd = [sys.executable, "-m", "bulkmail"]
    try:
        status = _read_only(folder, [*bulkmail_cmd, "status", "1", "--json", "--store", str(path)])
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["sent"] == 12
        recent = _read_only(folder, [*bulkmail_cmd, "recent", "--store", str(path)])
        assert recent.returncode == 0, recent.stderr
        assert "completed" in recent.stdout
        report = _read_only(folder, [*bulkmail_cmd, "report", "1", "--store", str(path)])
        assert report.returncode == 0, report.stderr
        assert report.stdout.count("sent") >= 12
        # what writes cannot run there, and says why in one line
        cancel = _read_only(folder, [*bulkmail_cmd, "cancel", "1", "--store", str(path)])
        assert cancel.returncode == 2 and len(cancel.stderr.strip().splitlines()) == 1, (
            cancel.stderr
        )
        assert files_in(folder) == ["jobs.db"]
    finally:
        folder.chmod(0o700)
