"""Mailtrap at full speed: ``/api/batch`` against one message per ``/api/send`` request, in
the same run, against a local Mailtrap fake that enforces the API's limit of 150 requests
per 10 s (429 with ``Retry-After`` beyond).

20,000 recipients at ``--rate 0`` go through the batch path (``batch_size = 500``). The
one-message-per-request path is bounded by the same 150 requests per 10 s, so 20,000
messages would take over 20 minutes: it is measured on a few hundred recipients and its
rate (messages per second of job time) extrapolated; the comparison is of the two rates.
Every outcome is checked: the store records every delivery sent, and the fake received
each Message-ID exactly once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.common import (
    HOST,
    SENDER,
    SUBJECT,
    TEMPLATE,
    Context,
    Result,
    Row,
    clean_env,
    fmt_s,
    ratio,
    run_process,
    verdict,
    write_csv,
)

NAME = "mailtrap_batch"
WINDOW = 10.0  # seconds
PER_WINDOW = 150  # requests per window, per token
BATCH_SIZE = 500
TARGET = 100.0  # batch messages/s over single messages/s


class MailtrapFake:
    """``/api/send`` and ``/api/batch`` on loopback, answering as Mailtrap documents, with
    the request limit enforced over a sliding window; it counts every Message-ID received
    in an accepted request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: deque[float] = deque()
        self.requests = 0
        self.throttled = 0
        self.received: dict[str, int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer, headers = fake.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                for key, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def __enter__(self) -> MailtrapFake:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests = self.throttled = 0
            self.received.clear()

    def answer(self, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        now = time.monotonic()
        with self.lock:
            self.requests += 1
            while self.accepted and self.accepted[0] <= now - WINDOW:
                self.accepted.popleft()
            if len(self.accepted) >= PER_WINDOW:
                self.throttled += 1
                wait = max(1, math.ceil(self.accepted[0] + WINDOW - now))
                return (
                    429,
                    {"success": False, "errors": ["Too many requests"]},
                    {"Retry-After": str(wait)},
                )
            self.accepted.append(now)
        doc = json.loads(body)
        entries = doc["requests"] if path.startswith("/api/batch") else [doc]
        ids = [e["headers"]["Message-ID"] for e in entries]
        with self.lock:
            for mid in ids:
                self.received[mid] = self.received.get(mid, 0) + 1
        if path.startswith("/api/batch"):
            responses = [{"success": True, "message_ids": [f"mt-{i}"]} for i in range(len(ids))]
            return 200, {"success": True, "responses": responses}, {}
        return 200, {"success": True, "message_ids": ["mt-1"]}, {}


def send(ctx: Context, fake: MailtrapFake, csv_path: Path, *, name: str, batch_size: int) -> Any:
    """``bulkmail send-reminders --provider mailtrap --rate 0`` as a user runs it; returns
    (job seconds, deliveries per state)."""
    where = ctx.fresh_dir(name)
    store = where / "bulkmail.db"
    env = clean_env(
        where / "home",
        {
            "BULKMAIL_MAILTRAP_TOKEN": "bench-token-0123456789",
            "BULKMAIL_MAILTRAP_API_URL": fake.url,
            "BULKMAIL_MAILTRAP_BATCH_SIZE": str(batch_size),
        },
    )
    argv = [str(ctx.bulkmail), "send-reminders", "--csv", str(csv_path)]
    argv += ["--template", str(TEMPLATE), "--subject", SUBJECT, "--provider", "mailtrap"]
    argv += ["--from", SENDER, "--yes", "--json", "--store", str(store), "--rate", "0"]
    proc = run_process(argv, env=env, cwd=where).check(f"bulkmail ({name})")
    job = json.loads(proc.stdout)
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        started, finished = db.execute(
            "SELECT started_at, finished_at FROM jobs WHERE id = ?", (job["id"],)
        ).fetchone()
        states = dict(
            db.execute(
                "SELECT state, count(*) FROM deliveries WHERE job_id = ? GROUP BY state",
                (job["id"],),
            ).fetchall()
        )
    db.close()
    return finished - started, states, proc.wall


def run(ctx: Context) -> Result:
    n_batch = 1_000 if ctx.quick else 20_000
    n_single = 40 if ctx.quick else 300
    result = Result(
        NAME,
        f"Mailtrap fake at {PER_WINDOW} requests / {WINDOW:g} s: {n_batch} recipients by "
        f"/api/batch ({BATCH_SIZE} per request) vs {n_single} by /api/send, --rate 0",
    )
    where = ctx.fresh_dir(NAME)
    rates: dict[str, float] = {}
    with MailtrapFake() as fake:
        for label, n, size in (("batch", n_batch, BATCH_SIZE), ("single", n_single, 1)):
            csv_path = write_csv(where / f"{label}.csv", n)
            fake.reset()
            ctx.log(f"{NAME}: {label}, {n} recipients")
            seconds, states, wall = send(ctx, fake, csv_path, name=label, batch_size=size)
            once = sum(1 for count in fake.received.values() if count == 1)
            recorded = states.get("sent", 0) == n and len(fake.received) == n and once == n
            rates[label] = n / seconds
            result.add(
                Row(
                    f"{label}: {n} messages, job time",
                    f"{fmt_s(seconds)} = {rates[label]:.1f} messages/s",
                    f"{fake.requests} requests, {fake.throttled} answered 429",
                    data={"seconds": seconds, "wall": wall, "requests": fake.requests},
                ),
                Row(
                    f"{label}: every outcome recorded, each message received once",
                    f"{states.get('sent', 0)} sent / {n}; {once} received once",
                    target="all",
                    verdict=verdict(recorded),
                    data={"states": states},
                ),
            )
    speedup = ratio(rates["batch"], rates["single"])
    result.add(
        Row(
            "batch vs one message per request (messages per second)",
            f"{speedup:.0f}x",
            f"single {rates['single']:.1f}/s extrapolated to {n_batch}: "
            f"{fmt_s(n_batch / rates['single'])}",
            f">= {TARGET:g}x",
            verdict(speedup >= TARGET),
            data={"speedup": speedup},
        )
    )
    result.note(
        f"the single path is measured on {n_single} recipients and extrapolated from its rate: "
        f"both paths are bounded by the same {PER_WINDOW} requests per {WINDOW:g} s"
    )
    return result
