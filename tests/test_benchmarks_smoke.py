"""The benchmark suite runs end to end on tiny inputs: ``python benchmarks/run.py --quick``.

Targets are not asserted here (tiny inputs are dominated by start-up, and a loaded test
machine is noisy); what must hold is that every benchmark runs, prints its table, and that
the correctness checks inside them (every message delivered once, every delivery recorded)
pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import PostfixSink

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("send_loop", "slow_link", "rate", "big_list", "startup", "mailtrap_batch")


def _run_quick(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    if not (Path(sys.executable).parent / "bulkmail").exists():
        pytest.skip("the bulkmail script is not installed next to this interpreter")
    out = tmp_path / "results.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-mailmerge"]
    proc = subprocess.run(
        [*argv, "--out", str(out), *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    shown = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc, out, shown


def test_quick_benchmarks_run_and_print_every_table(tmp_path: Path) -> None:
    before = _files(ROOT / "benchmarks")
    proc, out, shown = _run_quick(tmp_path)
    assert proc.returncode == 0, shown
    for name in BENCHMARKS:
        assert f"== {name}: " in proc.stdout, shown
    assert "FAILED" not in proc.stdout, shown

    doc = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in doc["results"]] == list(BENCHMARKS)
    assert doc["failed"] == []
    assert doc["failed_rows"] == []
    rows = {(r["name"], row["label"]): row for r in doc["results"] for row in r["rows"]}
    recorded = rows[("send_loop", "every delivery durably recorded")]
    assert recorded["verdict"] == "PASS", recorded
    if PostfixSink.find() is not None:  # CI installs postfix: this path runs there (as root)
        postfix = rows[("send_loop", "every delivery durably recorded (postfix smtp-sink)")]
        assert postfix["verdict"] == "PASS", postfix
    assert not any(label.endswith(": delivered") for _, label in rows), shown
    assert rows[("send_loop", "bulkmail vs mailmerge")]["verdict"] == "skipped"
    assert _files(ROOT / "benchmarks") == before, "the run wrote into benchmarks/"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_a_sink_that_dies_fails_its_own_row_and_the_others_still_run(tmp_path: Path) -> None:
    """An smtp-sink that cannot run (here: one that exits at once, as Postfix's did when it
    could not open its dump file) marks its row FAILED with its own words; the aiosmtpd rows
    are still measured and printed, and the run exits 1."""
    fake = tmp_path / "bin" / "smtp-sink"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho 'smtp-sink: fatal: open dump.txt: Permission denied' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc, out, shown = _run_quick(tmp_path, "--only", "send_loop", env=env)
    assert proc.returncode == 1, shown
    assert "== send_loop: " in proc.stdout, shown
    assert "FAILED send_loop: send loop (postfix smtp-sink)" in proc.stdout, shown
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["failed"] == []
    assert doc["failed_rows"] == [["send_loop", "send loop (postfix smtp-sink)"]]
    rows = {row["label"]: row for row in doc["results"][0]["rows"]}
    failed = rows["send loop (postfix smtp-sink)"]
    assert failed["verdict"] == "FAILED"
    assert "Permission denied" in failed["data"]["error"], failed
    assert rows["every delivery durably recorded"]["verdict"] == "PASS", shown
    assert rows["bulkmail --rate 0"]["measured"].endswith("msg/s"), shown
