"""The benchmark suite runs end to end on tiny inputs: ``python benchmarks/run.py --quick``.

Targets are not asserted here (tiny inputs are dominated by start-up, and a loaded test
machine is noisy); what must hold is that every benchmark runs, prints its table, and that
the correctness checks inside them (every message delivered once, every delivery recorded)
pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("send_loop", "slow_link", "rate", "big_list", "startup")


def test_quick_benchmarks_run_and_print_every_table(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "bulkmail").exists():
        pytest.skip("the bulkmail script is not installed next to this interpreter")
    out = tmp_path / "results.json"
    before = _files(ROOT / "benchmarks")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--no-mailmerge",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    shown = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, shown
    for name in BENCHMARKS:
        assert f"== {name}: " in proc.stdout, shown
    assert "FAILED" not in proc.stdout, shown

    doc = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in doc["results"]] == list(BENCHMARKS)
    assert doc["failed"] == []
    rows = {(r["name"], row["label"]): row for r in doc["results"] for row in r["rows"]}
    recorded = rows[("send_loop", "every delivery durably recorded")]
    assert recorded["verdict"] == "PASS", recorded
    assert not any(label.endswith(": delivered") for _, label in rows), shown
    assert rows[("send_loop", "bulkmail vs mailmerge")]["verdict"] == "skipped"
    assert _files(ROOT / "benchmarks") == before, "the run wrote into benchmarks/"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}
