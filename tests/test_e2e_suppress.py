"""The suppression list honoured while a job runs: an address suppressed after the job was
created (here `bulkmail suppress add` while a slow send is under way) is never sent to by
that job; it ends ``skipped`` with the reason, as a later job would skip it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.e2e import bulkmail, process_env, write_recipients
from tests.smtp_sink import SmtpSink

BULKMAIL = str(Path(sys.executable).parent / "bulkmail")


def test_an_address_suppressed_mid_job_is_skipped_not_sent(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    csv, emails = write_recipients(tmp_path, 6)
    store = str(tmp_path / "jobs.db")
    env = process_env(tmp_path, port=smtp_sink.port, store=store)
    proc = subprocess.Popen(
        [BULKMAIL, "send-reminders", "--yes", "--json", "--csv", str(csv),
         "--template", str(tmp_path / "t.txt"), "--subject", "Grades for {{ name }}",
         "--rate", "2", "--burst", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not smtp_sink.messages:  # the job runs: its first message is out
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no message reached the sink"
            time.sleep(0.01)
        last = emails[-1]  # due ~2.5 s after the first at 2/s
        added = bulkmail(
            "suppress", "add", last.upper(), "--reason", "complained", "--store", store
        )
        assert added.exit_code == 0, added.output
        seen = len(smtp_sink.messages)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    received = [m.rcpt_tos[0] for m in smtp_sink.messages]
    assert last not in received[seen:]  # nothing to it after the suppression...
    assert sorted(received) == emails[:-1]  # ...nor before: it was due last
    summary = json.loads(out)
    assert (summary["sent"], summary["skipped"]) == (5, 1)
    status = bulkmail("status", str(summary["id"]), "--skipped", "--json", "--store", store)
    doc = json.loads(status.stdout)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert [(s["email"], s["reason"]) for s in doc["skips"]] == [
        (last, f"suppressed: complained {day}")
    ]
    assert doc["state"] == "completed" and doc["skipped"] == 1
    assert doc["include_suppressed"] is False
