"""The light read path of status/recent/report: same answers as the full store, no
SQLAlchemy import, nothing created, older stores upgraded first."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from bulkmail.store import Claimed, Outcome, open_reader, open_store
from bulkmail.store.readonly import LiteReader, NoStore
from bulkmail.store.records import SCHEMA_VERSION
from tests.test_store import new_job, people, start


def test_reader_sees_what_the_store_sees(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = open_store(path)
    job = store.create_job(
        new_job(), people(5, skip={4: "duplicate of row 2"}), now=1.0, domain="d"
    )
    start(store, job)
    claimed = store.claim(job, "w1", now=100.0)
    assert isinstance(claimed, Claimed)
    store.record(Outcome.retry(claimed.delivery.id, "451", 0.0, in_doubt=True), "w1")
    claimed = store.claim(job, "w1", now=100.0)
    assert isinstance(claimed, Claimed)
    store.record(Outcome.failed(claimed.delivery.id, "550 no"), "w1")
    reader = open_reader(path)
    assert isinstance(reader, LiteReader)
    assert reader.view(job) == store.view(job)
    assert reader.recent(5) == store.recent(5)
    assert list(reader.deliveries(job, states=("failed",))) == list(
        store.deliveries(job, states=("failed",))
    )
    assert list(reader.deliveries(job, batch=2)) == list(store.deliveries(job))
    assert reader.counts(job).in_doubt == 1


def test_missing_store_is_not_created_by_reading(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    reader = open_reader(path)
    assert isinstance(reader, NoStore)
    assert reader.recent(3) == []
    assert not path.exists()


def test_status_and_recent_do_not_import_sqlalchemy(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    open_store(path).create_job(new_job(), people(2), now=1.0, domain="d")
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['bulkmail', 'recent', '--json', '--store', {str(path)!r}]\n"
        "try:\n    runpy.run_module('bulkmail', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('SQLALCHEMY' if 'sqlalchemy' in sys.modules else 'LIGHT', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert '"total": 2' in done.stdout
    assert done.stderr.strip().endswith("LIGHT")


def test_an_older_store_is_upgraded_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = open_store(path)
    job = store.create_job(new_job(), people(1), now=1.0, domain="d")
    store.close()
    with sqlite3.connect(path) as conn:  # what schema 1 looked like
        conn.execute("DROP INDEX ix_deliveries_in_doubt")
        conn.execute("ALTER TABLE workers DROP COLUMN host_id")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    reader = open_reader(path)
    assert not isinstance(reader, LiteReader)  # the full store, which migrated it
    assert reader.view(job).job.total == 1
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        columns = {r[1] for r in conn.execute("PRAGMA table_info(workers)")}
    assert "ix_deliveries_in_doubt" in names and version == (str(SCHEMA_VERSION),)
    assert "host_id" in columns
    assert isinstance(open_reader(path), LiteReader)


def test_report_cells_cannot_run_as_spreadsheet_formulas(tmp_path: Path) -> None:
    import csv
    import io

    from bulkmail.documents import write_report
    from bulkmail.store import NewDelivery

    store = open_store(tmp_path / "jobs.db")
    rows = [
        NewDelivery(2, "ada@example.edu", '=HYPERLINK("http://x.example","click")', {}),
        NewDelivery(3, "ben@example.edu", "Ben Okafor", {}, "+1 duplicate"),
    ]
    job = store.create_job(new_job(), rows, now=1.0, domain="d")
    out = io.StringIO()
    assert write_report(open_reader(tmp_path / "jobs.db"), job, out) == 2
    report = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert report[0]["name"] == '\'=HYPERLINK("http://x.example","click")'
    assert report[1]["name"] == "Ben Okafor"
    assert report[1]["error"] == "'+1 duplicate"
