"""A real PostgreSQL server for tests: a throwaway cluster, one fresh database per test.

``BULKMAIL_TEST_PG_URL`` (a server URL whose user may CREATE DATABASE) is used when set (CI
sets it in ``.ci/run``). Otherwise, when Debian's ``postgresql`` package (``initdb`` and
``pg_ctl``) is installed, a cluster is made in a temporary folder and started on a free
loopback port for the session, run as the ``postgres`` user when the tests run as root.
Without either, PostgreSQL tests skip with the reason; with ``BULKMAIL_TEST_PG_REQUIRED=1``
(CI) they fail instead, so a missing server can never pass as a green run.

The variables are read when this module is imported, before the autouse fixture of
conftest.py clears every ``BULKMAIL_*`` variable for each test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("BULKMAIL_TEST_PG_URL", "")
PG_REQUIRED = os.environ.get("BULKMAIL_TEST_PG_REQUIRED", "") not in ("", "0")

# a throwaway cluster: durability is not what these tests are about
SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200 -c listen_addresses=127.0.0.1 -c unix_socket_directories="
)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(reason: str) -> NoReturn:
    if PG_REQUIRED:
        pytest.fail(f"PostgreSQL is required here (BULKMAIL_TEST_PG_REQUIRED) but {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@dataclass
class PgServer:
    url: str  # the maintenance database; its user may create databases
    admin: sa.Engine
    cluster: _Cluster | None = None  # the throwaway cluster (None: BULKMAIL_TEST_PG_URL)

    def restart(self) -> None:
        """``pg_ctl restart -m fast -w`` of the throwaway cluster: every connection is cut
        and the server is back within a second (skips on a server given by URL)."""
        if self.cluster is None:
            pytest.skip("restarting the server needs the throwaway cluster, not a given URL")
        self.cluster.restart()

    def new_database(self) -> str:
        name = f"bulkmail_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return sa.make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = sa.make_url(url).database
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Cluster:
    """initdb + pg_ctl in a temporary folder (owned by ``postgres`` when we are root)."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.pg_ctl = pg_ctl
        self.initdb = initdb
        self.dir = Path(tempfile.mkdtemp(prefix="bulkmail-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the server as the package's user
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root and runuser is missing")
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {done.stderr.strip()} {log}")

    def start(self) -> str:
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")  # fmt: skip
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-p {self.port} {SERVER_OPTIONS}", "start")  # fmt: skip
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def restart(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w",
                  "-t", "60", "-o", f"-p {self.port} {SERVER_OPTIONS}", "restart")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A running PostgreSQL server for the session (skips, with the reason, without one)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')")
    cluster: _Cluster | None = None
    if PG_URL:
        url = PG_URL
    else:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            _unavailable(
                "set BULKMAIL_TEST_PG_URL or install Debian's postgresql package "
                "(initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin)"
            )
        cluster = _Cluster(initdb, pg_ctl)
        try:
            url = cluster.start()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            cluster.stop()
            pytest.fail(f"could not start a throwaway PostgreSQL cluster: {exc}")
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    admin = sa.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        if cluster is not None:
            cluster.stop()
        pytest.fail(f"cannot connect to the PostgreSQL test server: {exc.orig}")
    try:
        yield PgServer(parsed.render_as_string(hide_password=False), admin, cluster)
    finally:
        admin.dispose()
        if cluster is not None:
            cluster.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database of the test server, dropped after the test."""
    url = pg_server.new_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store location for each backend: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    url: str = request.getfixturevalue("pg_url")
    return url
