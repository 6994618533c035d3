"""Slow link: an SMTP sink that delays each reply by 20 ms (a WAN server). bulkmail at
``--concurrency 1`` and ``--concurrency 8`` and mailmerge on the same list; then
``--concurrency 8`` under a rate limit that binds, to check that eight connections still
share one limit."""

from __future__ import annotations

from benchmarks.common import (
    AiosmtpdSink,
    Context,
    Result,
    Row,
    SendRun,
    bulkmail_send,
    fmt_s,
    jitter_needed,
    mailmerge_send,
    max_in_window,
    ratio,
    verdict,
    write_csv,
)

NAME = "slow_link"
DELAY = 0.020
LIMIT_RATE = 40.0
LIMIT_BURST = 8
JITTER = 0.010  # receive-time noise allowed when checking windows


def _rate(n: int, seconds: float) -> str:
    return f"{fmt_s(seconds)} · {n / seconds:,.1f} msg/s"


def _check_sent(run: SendRun, n: int, got: int, what: str) -> None:
    if got != n or run.states.get("sent", 0) != n:
        raise AssertionError(f"{what}: sink got {got}, store has {run.states} for {n} recipients")


def run(ctx: Context) -> Result:
    n = 10 if ctx.quick else 200
    result = Result(NAME, f"{n} recipients, every SMTP reply {DELAY * 1000:.0f} ms late")
    where = ctx.fresh_dir(NAME)
    csv_path = write_csv(where / "recipients.csv", n)
    with AiosmtpdSink(ctx, delay=DELAY) as sink:
        ctx.log(f"{NAME}: bulkmail --concurrency 1, {n} recipients")
        sink.reset()
        one = bulkmail_send(ctx, csv_path, sink, name="slow-c1")
        _check_sent(one, n, sink.count(), "--concurrency 1")

        ctx.log(f"{NAME}: bulkmail --concurrency 8")
        sink.reset()
        eight = bulkmail_send(ctx, csv_path, sink, name="slow-c8", concurrency=8)
        _check_sent(eight, n, sink.count(), "--concurrency 8")

        merge = None
        if ctx.mailmerge_command() is not None:
            ctx.log(f"{NAME}: mailmerge")
            sink.reset()
            merge = mailmerge_send(ctx, csv_path, sink, name="slow-mailmerge")
            if sink.count() != n:
                raise AssertionError(f"mailmerge: sink got {sink.count()} of {n}")

        ctx.log(f"{NAME}: bulkmail --concurrency 8 --rate {LIMIT_RATE:g} --burst {LIMIT_BURST}")
        sink.reset()
        limited = bulkmail_send(
            ctx,
            csv_path,
            sink,
            name="slow-c8-limited",
            concurrency=8,
            rate=LIMIT_RATE,
            burst=LIMIT_BURST,
        )
        times = sink.times()
        _check_sent(limited, n, len(times), "--concurrency 8 with a rate limit")

    c1, c8 = one.proc.wall, eight.proc.wall
    result.add(
        Row(
            "bulkmail --concurrency 1 (reference)",
            _rate(n, c1),
            data={"wall_s": c1, "job_s": one.job_seconds},
        ),
        Row(
            "bulkmail --concurrency 8",
            _rate(n, c8),
            f"{ratio(c1, c8):.2f}x c1",
            ">= 6x --concurrency 1",
            verdict(ratio(c1, c8) >= 6),
            data={"wall_s": c8, "job_s": eight.job_seconds},
        ),
    )
    if merge is not None:
        result.add(
            Row(
                "mailmerge (new connection per message)",
                _rate(n, merge.wall),
                f"{ratio(c1, merge.wall):.2f}x c1",
                data={"wall_s": merge.wall},
            ),
            Row(
                "bulkmail --concurrency 8 vs mailmerge",
                f"{ratio(merge.wall, c8):.2f}x",
                f"{ratio(merge.wall, c8):.2f}x mailmerge",
                ">= 6x mailmerge",
                verdict(ratio(merge.wall, c8) >= 6),
            ),
        )
    else:
        result.add(
            Row("mailmerge", ctx.mailmerge_skip_reason, verdict="skipped"),
            Row("bulkmail --concurrency 8 vs mailmerge", "-", target=">= 6x", verdict="skipped"),
        )
    j1, j8 = one.job_seconds, eight.job_seconds
    if j1 and j8:
        result.add(
            Row(
                "  job started->finished, c8 vs c1",
                f"{fmt_s(j1)} / {fmt_s(j8)}",
                f"{ratio(j1, j8):.2f}x c1",
            )
        )
    # the burst goes out at once, then one send per interval: time the part after it
    after = times[LIMIT_BURST:]
    steady = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else 0.0
    window = max_in_window(times, 1.0)
    allowed = int(LIMIT_RATE * 1 + LIMIT_BURST)
    needed = jitter_needed(times, LIMIT_RATE, LIMIT_BURST)
    label = f"c8 at --rate {LIMIT_RATE:g} --burst {LIMIT_BURST}"
    result.add(
        Row(
            f"{label}: rate after the burst",
            f"{steady:.1f}/s",
            f"{ratio(steady, LIMIT_RATE):.3f}x rate",
            f"<= {LIMIT_RATE:g}/s + 2 %",
            verdict(steady <= LIMIT_RATE * 1.02),
            data={"steady_rate": steady, "wall_s": limited.proc.wall},
        ),
        Row(
            f"{label}: most sends in any 1 s",
            str(window),
            target=f"<= rate x 1 s + burst = {allowed}",
            verdict=verdict(window <= allowed),
        ),
        Row(
            f"{label}: any window, jitter needed",
            f"{needed * 1000:.1f} ms",
            target=f"count <= rate x t + burst, <= {JITTER * 1000:.0f} ms jitter",
            verdict=verdict(needed <= JITTER),
            data={"jitter_needed_s": needed},
        ),
    )
    result.note(
        "wall = process start to exit; c8 and c1 throughput compared on it (job-only ratio "
        "shown for information); the 20 ms delay applies to MAIL, RCPT and end of DATA"
    )
    return result
