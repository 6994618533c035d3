"""Big list: creating the job for a 100,000-row CSV (time, peak RSS), and ``status`` /
``recent`` on a store holding 1,000,000 deliveries.

Job creation is measured through the library, doing exactly what ``send-reminders`` does up
to the point where sending starts (``jobs.plan`` then ``jobs.create_job``), in a fresh
process whose whole wall time and peak RSS are reported. Its reference is a floor script:
a csv reader, one Jinja2 render per row (the body), one sqlite3 executemany in one
transaction; the job creation must stay within 2.5x that floor, measured in the same run.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SENDER,
    SUBJECT,
    TEMPLATE,
    Context,
    Proc,
    Result,
    Row,
    clean_env,
    fmt_mb,
    fmt_ms,
    fmt_s,
    median,
    ratio,
    run_process,
    timed_repeats,
    verdict,
    write_csv,
)

NAME = "big_list"
FLOOR_RATIO_LIMIT = 2.5  # job creation within 2.5x the floor script (issue 11)

CREATE_SCRIPT = """\
import json, resource, sys, time
t0 = time.perf_counter()
from bulkmail import jobs
from bulkmail.config import load_settings
from bulkmail.store import open_store
t1 = time.perf_counter()
csv_path, template, subject, store_path = sys.argv[1:5]
plan = jobs.plan(
    jobs.SourceOptions(csv=csv_path, template=template, subject=subject),
    jobs.SendOptions(provider="outbox"),
    load_settings(),
)
store = open_store(store_path)
t2 = time.perf_counter()
job_id = jobs.create_job(store, plan)
t3 = time.perf_counter()
print(json.dumps({
    "job_id": job_id,
    "deliveries": store.counts(job_id).total,
    "import_s": t1 - t0,
    "plan_s": t2 - t1,
    "create_s": t3 - t2,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""

# the floor, exactly (issue 11): a csv reader, ONE Jinja2 render per row (the body), and
# one sqlite3 executemany in one transaction; nothing bulkmail must do besides (the
# subject, validation, JSON, Message-IDs, dedupe, batches) is in it
FLOOR_SCRIPT = """\
import csv, sqlite3, sys
import jinja2
csv_path, template, subject_text, db_path = sys.argv[1:5]
env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
body = env.from_string(open(template, encoding="utf-8").read())
db = sqlite3.connect(db_path, isolation_level=None)
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = FULL")
db.execute(
    "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, position INTEGER, email TEXT, "
    "name TEXT, body TEXT)"
)
def rows():
    with open(csv_path, encoding="utf-8", newline="") as f:
        for position, row in enumerate(csv.reader(f)):
            if position == 0:
                header = row
                continue
            record = dict(zip(header, row))
            yield position, record["email"], record["name"], body.render(record)
db.execute("BEGIN IMMEDIATE")
db.executemany(
    "INSERT INTO deliveries (position, email, name, body) VALUES (?, ?, ?, ?)", rows()
)
db.execute("COMMIT")
"""

QUERY_SCRIPT = """\
import json, statistics, sys, time
from bulkmail.store import open_store
store = open_store(sys.argv[1])
job = int(sys.argv[2])
out = {}
for name, call in (("view", lambda: store.view(job)), ("recent", lambda: store.recent(10))):
    t = time.perf_counter(); call(); first = time.perf_counter() - t
    runs = []
    for _ in range(5):
        t = time.perf_counter(); call(); runs.append(time.perf_counter() - t)
    out[name] = {"first_s": first, "median_s": statistics.median(runs)}
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- job creation


def _job_creation(ctx: Context, result: Result) -> None:
    rows = 1_000 if ctx.quick else 100_000
    where = ctx.fresh_dir("big-csv")
    csv_path = write_csv(where / "recipients.csv", rows)
    create = where / "create_job.py"
    create.write_text(CREATE_SCRIPT)
    floor = where / "floor.py"
    floor.write_text(FLOOR_SCRIPT)
    env = clean_env(where / "home")
    repeats = 1 if ctx.quick else 3
    made: list[Proc] = []
    floors: list[Proc] = []
    for attempt in range(repeats):
        ctx.log(f"{NAME}: job creation for {rows:,} rows (run {attempt + 1}/{repeats})")
        store = where / f"bulkmail-{attempt}.db"
        made.append(
            run_process(
                [ctx.python, str(create), str(csv_path), str(TEMPLATE), SUBJECT, str(store)],
                env=env,
                cwd=where,
            ).check("job creation")
        )
        ctx.log(f"{NAME}: floor script (csv + jinja2 + sqlite3 executemany)")
        db = where / f"floor-{attempt}.db"
        floors.append(
            run_process(
                [ctx.python, str(floor), str(csv_path), str(TEMPLATE), SUBJECT, str(db)],
                env=env,
                cwd=where,
            ).check("floor script")
        )
    best = min(made, key=lambda p: p.wall)
    ref = min(floors, key=lambda p: p.wall)
    info = json.loads(best.stdout)
    if info["deliveries"] != rows:
        raise AssertionError(f"the job has {info['deliveries']} deliveries for {rows} rows")
    limit_s = 5.0 if not ctx.quick else 5.0 * rows / 100_000 + 1.0
    rss = max(p.maxrss_kib for p in made)
    result.add(
        Row(
            f"floor: csv + 1 jinja2 render/row + sqlite3 executemany, {rows:,} rows",
            f"{fmt_s(ref.wall)} · {fmt_mb(ref.maxrss_kib)}",
            data={"wall_s": ref.wall, "maxrss_kib": ref.maxrss_kib},
        ),
        Row(
            f"job creation, {rows:,} rows (whole process)",
            fmt_s(best.wall),
            f"{ratio(best.wall, ref.wall):.2f}x floor",
            f"<= {limit_s:g} s",
            verdict(best.wall <= limit_s),
            data={"wall_s": best.wall, "walls": [p.wall for p in made], **info},
        ),
        Row(
            "job creation / floor (same run)",
            f"{ratio(best.wall, ref.wall):.2f}x",
            "",
            f"<= {FLOOR_RATIO_LIMIT:g}x",
            verdict(ratio(best.wall, ref.wall) <= FLOOR_RATIO_LIMIT),
            data={"ratio": ratio(best.wall, ref.wall), "floor_walls": [p.wall for p in floors]},
        ),
        Row(
            "  import / plan / create_job",
            " / ".join(fmt_s(info[k]) for k in ("import_s", "plan_s", "create_s")),
        ),
        Row(
            "job creation peak RSS",
            fmt_mb(rss),
            f"{ratio(rss, ref.maxrss_kib):.2f}x floor",
            "<= 150 MB",
            verdict(rss <= 150 * 1024),
            data={"maxrss_kib": rss},
        ),
    )
    if ctx.quick:
        result.note(f"--quick: the time limit is scaled to {rows:,} rows ({limit_s:g} s)")


# --------------------------------------------------------------------------- a big store

_STATES = [("sent", 80), ("failed", 8), ("skipped", 4), ("pending", 6), ("cancelled", 2)]


def build_store(path: Path, total: int) -> dict[str, int]:
    """A store holding ``total`` deliveries: ten small completed jobs, then job 11, the
    newest, holding most of them (a paused job, states mixed, some in doubt). The schema is
    bulkmail's own (created by ``open_store``); rows go in with sqlite3 in one transaction,
    the secondary indexes dropped during the load and re-created from their own DDL."""
    from bulkmail.store import NewJob, open_store

    small = max(1, total // 1000)
    sizes = [small] * 10 + [total - 10 * small]
    store = open_store(path)
    new = NewJob(
        provider="smtp",
        provider_settings={"host": "smtp.example.edu", "port": 587, "security": "starttls"},
        account="smtp:office@smtp.example.edu:587",
        sender=SENDER,
        subject=SUBJECT,
        templates={"text": TEMPLATE.read_text(encoding="utf-8"), "html": None},
        source="instructors.csv",
        rate=0.1,
        burst=1,
        concurrency=1,
        max_retries=3,
        backoff=5.0,
        dedupe_key="autumn-grades",
    )
    now = time.time() - 86400
    job_ids = [store.create_job(new, [], now=now + i, domain="example.edu") for i in range(11)]
    store.close()

    rng = random.Random(11)
    weights = [w for _, w in _STATES]
    names = [s for s, _ in _STATES]

    def rows() -> Iterator[tuple[Any, ...]]:
        for job_id, size in zip(job_ids, sizes, strict=True):
            for position in range(1, size + 1):
                state = rng.choices(names, weights)[0] if job_id == job_ids[-1] else "sent"
                email = f"instructor.{job_id}.{position}@example.edu"
                fields = f'{{"course":"CS{position % 500}","due_date":"2025-09-05"}}'
                yield (
                    job_id,
                    position,
                    position + 1,
                    email,
                    email,
                    f"Instructor {position}",
                    fields,
                    state,
                    1 if state in ("sent", "failed") else 0,
                    "550 5.1.1 no such user" if state == "failed" else None,
                    0.0,
                    f"Q{position}" if state == "sent" else None,
                    f"<bulkmail.{job_id}.{position}.abcd1234@example.edu>",
                    now + position * 0.01 if state == "sent" else None,
                    "w1" if state in ("sent", "failed") else None,
                    1 if position % 200 == 0 else 0,
                )

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")  # building the fixture, not measuring it
        ddl = [
            sql
            for (sql,) in db.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'deliveries' AND sql IS NOT NULL"
            )
        ]
        names_idx = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'deliveries' AND sql IS NOT NULL"
            )
        ]
        db.execute("BEGIN IMMEDIATE")
        for name in names_idx:
            db.execute(f'DROP INDEX "{name}"')
        db.executemany(
            "INSERT INTO deliveries (job_id, position, row, email, email_key, name, fields, "
            "state, attempts, last_error, next_attempt_at, provider_message_id, message_id, "
            "sent_at, worker_id, in_doubt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
        for sql in ddl:
            db.execute(sql)
        for i, (job_id, size) in enumerate(zip(job_ids, sizes, strict=True)):
            big = job_id == job_ids[-1]
            db.execute(
                "UPDATE jobs SET total = ?, state = ?, started_at = ?, finished_at = ? "
                "WHERE id = ?",
                (
                    size,
                    "paused" if big else "completed",
                    now + i,
                    None if big else now + i + 600,
                    job_id,
                ),
            )
            db.execute(
                "INSERT INTO workers (id, job_id, host, pid, started_at, heartbeat_at, "
                "stopped_at, sent) VALUES (?, ?, 'bench', 4242, ?, ?, ?, ?)",
                (f"w{job_id}", job_id, now + i, now + i + 600, now + i + 600, size),
            )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return {
        "jobs": len(job_ids),
        "deliveries": sum(sizes),
        "big_job": job_ids[-1],
        "big": sizes[-1],
    }


def _status_recent(ctx: Context, result: Result) -> None:
    total = 2_000 if ctx.quick else 1_000_000
    where = ctx.fresh_dir("big-store")
    store = where / "bulkmail.db"
    ctx.log(f"{NAME}: building a store with {total:,} deliveries")
    t0 = time.perf_counter()
    built = build_store(store, total)
    build_s = time.perf_counter() - t0
    small = where / "small.db"
    build_store(small, 11)  # the same commands on a tiny store: what start-up alone costs
    env = clean_env(where / "home")
    bm = str(ctx.bulkmail)
    big = str(built["big_job"])  # the newest job: the one `recent` and `status` show

    def cli(*args: str, db: Path) -> Proc:
        return run_process([bm, *args, "--store", str(db)], env=env, cwd=where).check(args[0])

    repeats = 1 if ctx.quick else 5
    ctx.log(f"{NAME}: status / recent, {repeats} runs each")
    walls = timed_repeats(
        {
            "status": lambda: cli("status", big, "--json", db=store),
            "recent": lambda: cli("recent", "--limit", "10", "--json", db=store),
            "status-small": lambda: cli("status", big, "--json", db=small),
            "recent-small": lambda: cli("recent", "--limit", "10", "--json", db=small),
        },
        repeats,
    )
    doc = json.loads(cli("status", big, "--json", db=store).stdout)
    counted = sum(doc[k] for k in ("sent", "failed", "skipped", "pending", "cancelled"))
    if counted != built["big"]:
        raise AssertionError(f"status counts {counted} deliveries of {built['big']}")
    script = where / "query.py"
    script.write_text(QUERY_SCRIPT)
    queries = json.loads(
        run_process([ctx.python, str(script), str(store), big], env=env, cwd=where)
        .check("query timing")
        .stdout
    )
    result.add(
        Row(
            f"store: {built['deliveries']:,} deliveries in {built['jobs']} jobs",
            f"built in {fmt_s(build_s)}",
            data={**built, "build_s": build_s},
        )
    )
    for command, query in (("status", "view"), ("recent", "recent")):
        wall, tiny = median(walls[command]), median(walls[f"{command}-small"])
        label = f"status {big} --json" if command == "status" else "recent --limit 10 --json"
        result.add(
            Row(
                f"bulkmail {label} (median of {repeats})",
                fmt_ms(wall),
                f"{ratio(wall, tiny):.2f}x tiny store",
                "<= 150 ms",
                verdict(wall <= 0.150),
                data={"median_s": wall, "walls": walls[command], "tiny_store_s": tiny},
            ),
            Row(
                f"  in-process Store.{query}(): first / median",
                f"{fmt_ms(queries[query]['first_s'])} / {fmt_ms(queries[query]['median_s'])}",
                data=queries[query],
            ),
        )
    result.add(
        Row(
            "  same commands on a tiny store: status / recent",
            f"{fmt_ms(median(walls['status-small']))} / {fmt_ms(median(walls['recent-small']))}",
        )
    )


def run(ctx: Context) -> Result:
    result = Result(NAME, "job creation for a big CSV; status/recent on a big store")
    _job_creation(ctx, result)
    _status_recent(ctx, result)
    return result
