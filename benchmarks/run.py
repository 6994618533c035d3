"""Run bulkmail's benchmarks and print one table per benchmark.

    python benchmarks/run.py                     # everything, full size (a few minutes)
    python benchmarks/run.py --quick             # everything on tiny inputs (well under 60 s)
    python benchmarks/run.py --only send_loop rate --no-mailmerge --out results.json

Every number is compared with a reference measured in the same run (machines are noisy:
absolute numbers do not compare across runs), and each target is marked PASS or MISS.
Exit status: 0 when every benchmark ran (whatever the targets said; --strict: 3 when a
target was missed), 1 when a benchmark, or one of its measurements, could not run (its row
says FAILED and why; the other rows and benchmarks still run and print).
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # run from a checkout: leave no __pycache__ behind

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import big_list, mailtrap_batch, rate, send_loop, slow_link, startup  # noqa: E402
from benchmarks.common import Context, Result, print_result  # noqa: E402

BENCHMARKS: dict[str, ModuleType] = {
    "send_loop": send_loop,
    "slow_link": slow_link,
    "rate": rate,
    "big_list": big_list,
    "startup": startup,
    "mailtrap_batch": mailtrap_batch,
}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bulkmail-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny inputs: a smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these"
    )
    parser.add_argument("--no-mailmerge", action="store_true", help="skip the mailmerge runs")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where the mailmerge venv is kept"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHMARKS)
    workdir = Path(tempfile.mkdtemp(prefix="bulkmail-bench-"))
    shm = Path("/dev/shm")
    fast_root = shm if shm.is_dir() and os.access(shm, os.W_OK) else workdir
    fastdir = Path(tempfile.mkdtemp(prefix="bulkmail-bench-", dir=fast_root))
    ctx = Context(
        quick=args.quick,
        workdir=workdir,
        fastdir=fastdir,
        cache_dir=args.cache_dir or default_cache(),
        mailmerge=not args.no_mailmerge,
    )
    print(
        f"bulkmail benchmarks{' (quick)' if args.quick else ''}: python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, work dir {workdir}",
        flush=True,
    )
    results: list[Result] = []
    failed: list[str] = []
    started = time.perf_counter()
    try:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            bench: Callable[[Context], Result] = BENCHMARKS[name].run
            try:
                result = bench(ctx)
            except Exception as exc:
                failed.append(name)
                print(f"\n== {name}: FAILED ==\n{exc}", flush=True)
                traceback.print_exc()
                continue
            result.note(f"took {time.perf_counter() - t0:.1f} s")
            results.append(result)
            print_result(result)
            sys.stdout.flush()
    finally:
        if args.keep:
            print(f"kept {workdir} and {fastdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(fastdir, ignore_errors=True)
    misses = [(r.name, row.label) for r in results for row in r.misses]
    failed_rows = [(r.name, row.label) for r in results for row in r.failures]
    print(
        f"\n{len(results)} benchmark(s) in {time.perf_counter() - started:.0f} s; "
        f"{len(misses)} target(s) missed"
        + "".join(f"\n  MISS {name}: {label.strip()}" for name, label in misses)
        + "".join(f"\n  FAILED {name}: {label.strip()}" for name, label in failed_rows)
        + "".join(f"\n  FAILED {name}" for name in failed),
        flush=True,
    )
    if args.out:
        doc = {
            "quick": args.quick,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": [r.to_json() for r in results],
            "failed": failed,
            "failed_rows": [list(item) for item in failed_rows],
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if failed or failed_rows:
        return 1
    if args.strict and misses:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
