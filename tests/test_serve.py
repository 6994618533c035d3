"""`bulkmail serve` as a real process on a free loopback port: signed and badly signed
webhook posts, JSON and JSON Lines, duplicates, the body limit, the loopback rule."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bulkmail import events
from bulkmail.store import open_store
from tests.test_events import send_all, webhook_event
from tests.test_store import new_job, people

SECRET = "whsec-test-0123456789"

pytest.importorskip("flask", reason="bulkmail serve needs the web extra (flask, waitress)")
pytest.importorskip("waitress", reason="bulkmail serve needs the web extra (flask, waitress)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"bulkmail serve exited {proc.returncode}: {out}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("bulkmail serve did not listen in time")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[Any]]]:
    path = tmp_path / "jobs.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(3), now=1.0, domain="example.edu")
    sent = send_all(s, job_id)
    s.close()
    port = free_port()
    env = {**os.environ, "BULKMAIL_MAILTRAP_WEBHOOK_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkmail", "serve", "--port", str(port), "--store", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}/webhooks/mailtrap", path, sent
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(url: str, body: bytes, signature: str | None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Mailtrap-Signature"] = signature
    return requests.post(url, data=body, headers=headers, timeout=30)


def test_signed_posts_are_recorded_once_and_bad_ones_refused(
    served: tuple[str, Path, list[Any]],
) -> None:
    url, path, sent = served
    body = json.dumps(
        {
            "events": [
                webhook_event("delivery", sent[0], 1),
                webhook_event("bounce", sent[1], 2, response="550 5.1.1 user unknown"),
            ]
        }
    ).encode()
    assert post(url, body, None).status_code == 401
    assert post(url, body, "0" * 64).status_code == 401
    assert post(url, body, events.sign("wrong secret", body)).status_code == 401
    tampered = body.replace(b"550", b"250")
    assert post(url, tampered, events.sign(SECRET, body)).status_code == 401
    ok = post(url, body, events.sign(SECRET, body))
    assert ok.status_code == 200, ok.text
    assert ok.json()["recorded"] == 2 and ok.json()["suppressed"] == 1
    # the same events again (Mailtrap retries), as JSON Lines with one new event
    lines = b"\n".join(
        json.dumps(webhook_event(k, d, n)).encode()
        for k, d, n in (("delivery", sent[0], 1), ("spam", sent[2], 3))
    )
    again = post(url, lines, events.sign(SECRET, lines).upper())
    assert again.status_code == 200, again.text
    assert (again.json()["recorded"], again.json()["duplicates"]) == (1, 1)
    garbage = b"not json at all"
    assert post(url, garbage, events.sign(SECRET, garbage)).status_code == 400
    big = b" " * (5 * 1024 * 1024 + 10)
    assert post(url, big, events.sign(SECRET, big)).status_code == 413
    s = open_store(path, create=False)
    try:
        counts = s.counts(sent[0].job_id)
        assert (counts.delivered, counts.bounced, counts.complained) == (1, 1, 1)
    finally:
        s.close()


def test_serve_refuses_a_public_address(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    open_store(path).close()
    base = [sys.executable, "-m", "bulkmail", "serve", "--store", str(path)]
    env = {**os.environ, "BULKMAIL_MAILTRAP_WEBHOOK_SECRET": SECRET}
    public = subprocess.run([*base, "--host", "0.0.0.0"], env=env, capture_output=True,
                            timeout=60)  # fmt: skip
    assert public.returncode == 2
    assert b"--behind-proxy" in public.stderr
    assert b"Traceback" not in public.stderr


def test_serve_without_a_webhook_secret_serves_the_dashboard_and_no_webhooks(
    tmp_path: Path,
) -> None:
    """A dashboard-only server (an office on SMTP has no Mailtrap webhooks): it starts,
    says webhooks are off, answers the API, and has no webhook route to post unsigned
    events to."""
    path = tmp_path / "jobs.db"
    open_store(path).close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BULKMAIL_MAILTRAP_WEBHOOK_SECRET"}
    env["HOME"] = str(tmp_path)  # no user config file with a secret in it
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    cmd = [sys.executable, "-m", "bulkmail", "serve", "--port", str(port), "--store", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        hook = requests.post(f"{base}/webhooks/mailtrap", data=b"{}", timeout=30)
        assert hook.status_code == 404
        api = requests.get(f"{base}/api/bulk-email/recent-jobs", timeout=30)
        assert api.status_code == 401  # the API is there, and wants a token
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"no webhooks: set BULKMAIL_MAILTRAP_WEBHOOK_SECRET" in err
    assert b"Traceback" not in err


def test_serve_without_the_web_extra_is_one_line(tmp_path: Path) -> None:
    """A plain `pip install bulkmail` has no Flask: `serve` says how to get it (exit 2),
    never a traceback, and the token commands, which need no Flask, still work."""
    path = tmp_path / "jobs.db"
    open_store(path).close()
    code = (
        "import sys; sys.modules['flask'] = None; from bulkmail.cli import main; "
        "sys.argv[0] = 'bulkmail'; main()"
    )
    base = [sys.executable, "-c", code]
    served = subprocess.run([*base, "serve", "--store", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert served.returncode == 2
    assert served.stderr.strip().splitlines() == [
        "bulkmail: bulkmail serve needs Flask and waitress: pip install 'bulkmail[web]'"
    ]
    listed = subprocess.run([*base, "serve", "token", "list", "--store", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
