"""Start-up: ``bulkmail --help``, ``bulkmail recent --limit 3 --json`` and ``bulkmail status 1
--json`` against the same kind of calls of a minimal Typer app (one command, an int option
and a bool flag) run by the same interpreter: Typer's own floor."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    EXAMPLES,
    SUBJECT,
    TEMPLATE,
    Context,
    Proc,
    Result,
    Row,
    clean_env,
    fmt_ms,
    median,
    ratio,
    run_process,
    timed_repeats,
    verdict,
)

NAME = "startup"

MINIMAL_APP = '''\
"""The smallest useful Typer app: Typer's own start-up floor."""
import json

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    limit: int = typer.Option(10, "--limit", help="How many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List things."""
    print(json.dumps({"limit": limit}) if as_json else limit)


if __name__ == "__main__":
    app()
'''


def _hyperfine(
    ctx: Context, commands: dict[str, list[str]], repeats: int, env: dict[str, str], cwd: Path
) -> dict[str, list[float]] | None:
    """Median-ready wall times from hyperfine when it is installed."""
    program = shutil.which("hyperfine")
    if program is None:
        return None
    export = cwd / "hyperfine.json"
    argv = [program, "--warmup", "1", "--runs", str(repeats), "--export-json", str(export)]
    argv += ["--style", "none", "-N"]
    names = list(commands)
    for name in names:
        argv += ["-n", name, shlex.join(commands[name])]
    if run_process(argv, env=env, cwd=cwd).returncode != 0:
        return None
    data = json.loads(export.read_text())
    return {name: list(r["times"]) for name, r in zip(names, data["results"], strict=True)}


def run(ctx: Context) -> Result:
    repeats = 1 if ctx.quick else 15
    result = Result(NAME, f"process start to exit, median of {repeats} interleaved runs")
    where = ctx.fresh_dir(NAME)
    env = clean_env(where / "home")
    app = where / "minimal_app.py"
    app.write_text(MINIMAL_APP)
    store = where / "bulkmail.db"
    bm = str(ctx.bulkmail)
    jobs = 1 if ctx.quick else 3
    ctx.log(f"{NAME}: {jobs} outbox job(s) of the example list, for recent/status")
    for _ in range(jobs):
        argv = [bm, "send-reminders", "--csv", str(EXAMPLES / "instructors.csv")]
        argv += ["--template", str(TEMPLATE), "--subject", SUBJECT, "--provider", "outbox"]
        argv += ["--yes", "--json", "--store", str(store)]
        run_process(argv, env=env, cwd=where).check("an outbox job")

    commands: dict[str, list[str]] = {
        "typer --help": [ctx.python, str(app), "--help"],
        "typer --limit 3 --json": [ctx.python, str(app), "--limit", "3", "--json"],
        "bulkmail --help": [bm, "--help"],
        "bulkmail recent --limit 3 --json": [bm, "recent", "--limit", "3", "--json"],
        "bulkmail status 1 --json": [bm, "status", "1", "--json"],
    }
    for name in ("bulkmail recent --limit 3 --json", "bulkmail status 1 --json"):
        commands[name] += ["--store", str(store)]

    def runner(argv: list[str]) -> Callable[[], Proc]:
        return lambda: run_process(argv, env=env, cwd=where).check(" ".join(argv[:3]))

    ctx.log(f"{NAME}: {len(commands)} commands x {repeats} runs")
    walls = _hyperfine(ctx, commands, repeats, env, where)
    tool = "hyperfine"
    if walls is None:
        tool = "own loop"
        walls = timed_repeats({name: runner(argv) for name, argv in commands.items()}, repeats)
    med = {name: median(w) for name, w in walls.items()}
    low = {name: min(w) for name, w in walls.items()}

    def shown(name: str) -> str:
        return f"{fmt_ms(med[name])} (min {fmt_ms(low[name])})"

    help_ref, call_ref = med["typer --help"], med["typer --limit 3 --json"]
    result.add(
        Row("minimal Typer app --help (reference)", shown("typer --help"), data={"walls": walls}),
        Row("minimal Typer app --limit 3 --json (reference)", shown("typer --limit 3 --json")),
        Row(
            "bulkmail --help",
            shown("bulkmail --help"),
            f"{ratio(med['bulkmail --help'], help_ref):.2f}x typer --help",
            "<= 1.3x",
            verdict(ratio(med["bulkmail --help"], help_ref) <= 1.3),
        ),
    )
    for name in ("bulkmail recent --limit 3 --json", "bulkmail status 1 --json"):
        r = ratio(med[name], call_ref)
        result.add(Row(name, shown(name), f"{r:.2f}x typer call", "<= 1.6x", verdict(r <= 1.6)))
    result.note(f"timed with {tool}; one untimed warm-up round; same interpreter and venv")
    return result
