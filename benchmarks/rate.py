"""Rate accuracy: ``--rate 20 --burst 1`` for about 10 s, measured where it matters: the
times at which the SMTP server received each message."""

from __future__ import annotations

import itertools

from benchmarks.common import (
    AiosmtpdSink,
    Context,
    Result,
    Row,
    bulkmail_send,
    fmt_s,
    jitter_needed,
    max_in_window,
    verdict,
    write_csv,
)

NAME = "rate"
RATE = 20.0
BURST = 1
JITTER = 0.010  # receive-time noise allowed when checking windows of any length


def run(ctx: Context) -> Result:
    seconds = 1 if ctx.quick else 10
    n = int(RATE * seconds)
    result = Result(NAME, f"--rate {RATE:g} --burst {BURST} for {seconds} s ({n} recipients)")
    where = ctx.fresh_dir(NAME)
    csv_path = write_csv(where / "recipients.csv", n)
    with AiosmtpdSink(ctx) as sink:
        ctx.log(f"{NAME}: bulkmail --rate {RATE:g} --burst {BURST}, {n} recipients")
        sink.reset()
        sent = bulkmail_send(ctx, csv_path, sink, name="rate", rate=RATE, burst=BURST)
        times = sink.times()
    if len(times) != n or sent.states.get("sent", 0) != n:
        raise AssertionError(f"sink got {len(times)}, store {sent.states}, for {n} recipients")
    span = times[-1] - times[0]
    achieved = (n - 1) / span
    error = (achieved - RATE) / RATE * 100
    window = max_in_window(times, 1.0)
    allowed = int(RATE + BURST)
    needed = jitter_needed(times, RATE, BURST)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    result.add(
        Row(
            "achieved rate (n-1)/(last-first)",
            f"{achieved:.3f}/s",
            f"{error:+.2f} % vs {RATE:g}/s",
            "within +-2 %",
            verdict(abs(error) <= 2),
            data={"achieved": achieved, "error_pct": error, "span_s": span},
        ),
        Row(
            "most sends in any 1 s window",
            str(window),
            target=f"<= rate x 1 s + burst = {allowed}",
            verdict=verdict(window <= allowed),
            data={"max_1s": window},
        ),
        Row(
            "any window of t s: receive jitter needed",
            f"{needed * 1000:.1f} ms",
            target=f"count <= rate x t + burst, <= {JITTER * 1000:.0f} ms jitter",
            verdict=verdict(needed <= JITTER),
            data={"jitter_needed_s": needed},
        ),
        Row(
            "gap between receipts: min / median / max",
            " / ".join(
                f"{g * 1000:.1f}" for g in (min(gaps), sorted(gaps)[len(gaps) // 2], max(gaps))
            )
            + " ms",
            f"interval {1000 / RATE:.0f} ms",
        ),
        Row("process wall time", fmt_s(sent.proc.wall), f"ideal send span {(n - 1) / RATE:.2f} s"),
    )
    result.note("receive times are the sink's time.time() when each message's data was accepted")
    return result
