"""The README's "Course database, Mailtrap, preview and reports" commands, exactly as written,
in one shell with the installed `bulkmail` script: build the database, preview, dry run,
send through Mailtrap (a real HTTP server on loopback stands in for the API), report."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.e2e import EXAMPLES, REPO

SECTION = "## Course database, Mailtrap, preview and reports"


def section_commands() -> list[str]:
    """The `$ ` commands of the section's console blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```console\n(.*?)```", body, re.DOTALL):
        current: str | None = None
        for line in block.splitlines():
            if current is not None:
                current += " " + line.strip()
            elif line.startswith("$ "):
                current = line[2:]
            else:
                continue  # output shown in the README
            if current.endswith("\\"):
                current = current[:-1].rstrip()
            else:
                commands.append(current)
                current = None
    return commands


def test_readme_section_runs_as_written(httpserver: HTTPServer, tmp_path: Path) -> None:
    commands = section_commands()
    assert [c.split()[0] for c in commands] == [
        "python",
        'JOIN="SELECT',
        "bulkmail",
        "bulkmail",
        "export",
        "bulkmail",
        "bulkmail",
        "bulkmail",
    ]
    requests: list[dict[str, object]] = []

    def api(request: Request) -> Response:
        requests.append(json.loads(request.get_data()))
        answer = {"success": True, "message_ids": [f"id-{len(requests)}"]}
        return Response(json.dumps(answer), 200, mimetype="application/json")

    def batch(request: Request) -> Response:  # issue 13: batches are the default
        entries = json.loads(request.get_data())["requests"]
        if not entries:  # the pre-flight check's empty batch: a valid token, nothing sent
            answer = {"success": False, "errors": ["requests must not be empty"]}
            return Response(json.dumps(answer), 400, mimetype="application/json")
        results = []
        for entry in entries:
            requests.append(entry)
            results.append({"success": True, "message_ids": [f"id-{len(requests)}"]})
        answer = {"success": True, "responses": results}
        return Response(json.dumps(answer), 200, mimetype="application/json")

    httpserver.expect_request("/api/send", method="POST").respond_with_handler(api)
    httpserver.expect_request("/api/batch", method="POST").respond_with_handler(batch)
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    script = "\n".join(f'{c}\necho "@@ exit $?"' for c in commands)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "BULKMAIL_MAILTRAP_API_URL": httpserver.url_for("/"),
        "BULKMAIL_RATE": "0",  # the README's run would take two minutes at the default rate
        "COLUMNS": "200",
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    outputs = done.stdout.split("@@ exit ")
    codes = [int(chunk.split("\n", 1)[0]) for chunk in outputs[1:]]
    assert codes == [0] * len(commands), (done.stdout, done.stderr)
    made, _, preview, dry_run, _, sent, to_file, to_stdout = outputs[: len(commands)]
    assert "course.db: 12 instructors, 12 courses" in made
    assert preview.count("message ") == 2 and "Dear Ada Whitfield," in preview
    assert "Reminder: CS220 grades due 2025-09-05" in preview
    assert "12 to send, 0 skipped" in dry_run and "nothing was sent" in dry_run
    assert "completed" in sent.split("\n", 1)[1]
    assert len(requests) == 12
    assert "wrote 12 rows to job1.csv" in done.stderr
    report = (tmp_path / "job1.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(report)))
    assert {r["state"] for r in rows} == {"sent"} and len(rows) == 12
    assert {r["provider_message_id"] for r in rows} == {f"id-{n}" for n in range(1, 13)}
    assert to_file.split("\n", 1)[1] == ""  # the file only; "wrote ..." went to stderr
    assert to_stdout.split("\n", 1)[1] == report
