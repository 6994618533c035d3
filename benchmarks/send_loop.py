"""Send loop: N recipients at ``--rate 0`` to a local SMTP sink, against a bare smtplib loop
(one reused connection, one EmailMessage per recipient) and mailmerge on the same list.

Throughput is compared as process wall time, start to exit, for every contender (what a user
waits for); the job's own started->finished time is shown too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    SENDER,
    SUBJECT,
    TEMPLATE,
    AiosmtpdSink,
    BenchmarkError,
    Context,
    PostfixSink,
    Proc,
    Result,
    Row,
    SendRun,
    Sink,
    bulkmail_send,
    clean_env,
    fmt_mb,
    fmt_s,
    mailmerge_send,
    ratio,
    run_process,
    verdict,
    write_csv,
)

NAME = "send_loop"

BARE_SCRIPT = '''\
"""The reference: one smtplib connection, one EmailMessage built per recipient."""
import csv
import smtplib
import sys
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid

import jinja2

csv_path, port, template_path, subject_text, sender = sys.argv[1:6]
env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
body = env.from_string(open(template_path, encoding="utf-8").read())
subject = env.from_string(subject_text)
name, _, addr = sender.rpartition(" <")
with smtplib.SMTP("127.0.0.1", int(port)) as smtp, open(csv_path, encoding="utf-8") as f:
    for row in csv.DictReader(f):
        msg = EmailMessage()
        msg["From"] = Address(name, addr_spec=addr.rstrip(">"))
        local, _, domain = row["email"].rpartition("@")
        msg["To"] = Address(row["name"], local, domain)
        msg["Subject"] = subject.render(row)
        msg["Message-ID"] = make_msgid(domain="example.edu")
        msg.set_content(body.render(row))
        refused = smtp.send_message(msg)
        if refused:
            sys.exit(f"refused: {refused}")
'''


def _bare(ctx: Context, csv_path: Path, sink: Sink, script: Path) -> Proc:
    where = ctx.fresh_dir("bare-smtplib")
    argv = [ctx.python, str(script), str(csv_path), str(sink.port), str(TEMPLATE)]
    argv += [SUBJECT, SENDER]
    return run_process(argv, env=clean_env(where / "home"), cwd=where).check("bare smtplib")


def _rate(n: int, seconds: float) -> str:
    return f"{fmt_s(seconds)} · {n / seconds:,.0f} msg/s"


def _delivered(
    result: Result, label: str, sink: Sink, n: int, states: dict[str, int] | None
) -> None:
    got = sink.count()
    ok = got == n
    measured = f"sink got {got}/{n}"
    if states is not None:
        sent = states.get("sent", 0)
        ok = ok and sent == n
        measured += f"; store: {sent} sent"
    if not ok:
        result.add(Row(f"{label}: delivered", measured, target=f"exactly {n}", verdict="MISS"))


def _against(
    ctx: Context, result: Result, sink: Sink, csv_path: Path, n: int, script: Path, tag: str
) -> None:
    repeats = 1 if ctx.quick else 2
    bare: list[float] = []
    bulk: list[tuple[float, SendRun, float]] = []  # wall, run, wall-clock start
    merge: list[float] = []
    wide: list[float] = []
    for attempt in range(repeats):
        ctx.log(f"{NAME}{tag}: bare smtplib, {n} recipients (run {attempt + 1}/{repeats})")
        sink.reset()
        bare.append(_bare(ctx, csv_path, sink, script).wall)
        _delivered(result, f"bare smtplib{tag}", sink, n, None)

        ctx.log(f"{NAME}{tag}: bulkmail --rate 0, {n} recipients")
        sink.reset()
        t0 = time.time()
        run = bulkmail_send(ctx, csv_path, sink, name="bulkmail-c1")
        bulk.append((run.proc.wall, run, t0))
        _delivered(result, f"bulkmail{tag}", sink, n, run.states)

        if ctx.mailmerge_command() is not None:
            ctx.log(f"{NAME}{tag}: mailmerge {n} recipients")
            sink.reset()
            proc = mailmerge_send(ctx, csv_path, sink, name="mailmerge")
            assert proc is not None
            merge.append(proc.wall)
            _delivered(result, f"mailmerge{tag}", sink, n, None)

        ctx.log(f"{NAME}{tag}: bulkmail --concurrency 4")
        sink.reset()
        run4 = bulkmail_send(ctx, csv_path, sink, name="bulkmail-c4", concurrency=4)
        wide.append(run4.proc.wall)
        _delivered(result, f"bulkmail --concurrency 4{tag}", sink, n, run4.states)

    ref = min(bare)
    wall, run, t0 = min(bulk, key=lambda item: item[0])
    result.add(
        Row(
            f"bare smtplib{tag} (reference)",
            _rate(n, ref),
            data={"wall_s": ref, "walls": bare},
        ),
        Row(
            f"bulkmail --rate 0{tag}",
            _rate(n, wall),
            f"{ratio(ref, wall):.2f}x bare",
            ">= 0.90x bare smtplib",
            verdict(ratio(ref, wall) >= 0.9),
            data={"wall_s": wall, "walls": [b[0] for b in bulk], "maxrss_kib": run.proc.maxrss_kib},
        ),
    )
    if merge:
        mm = min(merge)
        result.add(
            Row(
                f"mailmerge {tag.strip()}".strip() + " (new connection per message)",
                _rate(n, mm),
                f"{ratio(ref, mm):.2f}x bare",
                data={"wall_s": mm, "walls": merge},
            ),
            Row(
                f"bulkmail vs mailmerge{tag}",
                f"{ratio(mm, wall):.2f}x",
                f"{ratio(mm, wall):.2f}x mailmerge",
                ">= 1.50x mailmerge",
                verdict(ratio(mm, wall) >= 1.5),
            ),
        )
    else:
        result.add(
            Row(f"mailmerge{tag}", ctx.mailmerge_skip_reason, verdict="skipped"),
            Row(
                f"bulkmail vs mailmerge{tag}",
                "-",
                target=">= 1.50x mailmerge",
                verdict="skipped",
            ),
        )
    job = run.job_seconds
    if job is not None and run.started_at is not None:
        result.add(
            Row(
                f"  bulkmail job started->finished{tag}",
                _rate(n, job),
                f"{ratio(ref, job):.2f}x bare",
                data={"job_s": job},
            ),
            Row(
                f"  bulkmail process start -> job started{tag}",
                fmt_s(run.started_at - t0),
                data={"startup_s": run.started_at - t0},
            ),
            Row(f"  bulkmail peak RSS{tag}", fmt_mb(run.proc.maxrss_kib)),
        )
    sent = run.states.get("sent", 0)
    result.add(
        Row(
            f"every delivery durably recorded{tag}",
            f"{sent}/{n} sent in store",
            target="all, synchronous=FULL",
            verdict=verdict(sent == n and run.job.get("state") == "completed"),
        ),
        Row(
            f"bulkmail --concurrency 4{tag} (information)",
            _rate(n, min(wide)),
            f"{ratio(ref, min(wide)):.2f}x bare",
            data={"wall_s": min(wide)},
        ),
    )


def _against_sink(
    ctx: Context,
    result: Result,
    make_sink: Callable[[], AiosmtpdSink | PostfixSink],
    csv_path: Path,
    n: int,
    script: Path,
    tag: str,
) -> None:
    """The comparison against one sink; when it cannot run (the sink does not start or dies,
    a contender fails), one FAILED row says why and the other sinks' rows still run."""
    label = f"send loop{tag or ' (aiosmtpd sink)'}"
    try:
        with make_sink() as sink:
            try:
                _against(ctx, result, sink, csv_path, n, script, tag)
            except BenchmarkError as exc:
                time.sleep(0.1)  # a sink that just died: let it finish writing why
                died = sink.death()
                if died is None:
                    raise
                raise BenchmarkError(f"{died}\n{exc}") from None
    except BenchmarkError as exc:
        result.add_failure(label, exc)


def run(ctx: Context) -> Result:
    n = 20 if ctx.quick else 2000
    result = Result(NAME, f"{n} recipients at --rate 0 to a local SMTP sink")
    where = ctx.fresh_dir(NAME)
    csv_path = write_csv(where / "recipients.csv", n)
    script = where / "bare_smtplib.py"
    script.write_text(BARE_SCRIPT)
    _against_sink(ctx, result, lambda: AiosmtpdSink(ctx), csv_path, n, script, "")
    program = PostfixSink.find()
    if program is None:
        result.add(
            Row(
                "postfix smtp-sink",
                "skipped: smtp-sink not installed (Debian package postfix)",
                verdict="skipped",
            )
        )
    else:
        tag = " (postfix smtp-sink)"
        _against_sink(ctx, result, lambda: PostfixSink(ctx, program), csv_path, n, script, tag)
    result.note(
        "wall = process start to exit, best of "
        f"{1 if ctx.quick else 2} runs each; ratios > 1 mean faster than the reference"
    )
    result.note("the aiosmtpd sink runs in its own process and records to tmpfs (no fsync)")
    return result
