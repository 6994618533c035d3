"""Shared set-up of the dashboard tests: a real store with a sender and a viewer token, the
example CSV as a configured source, the example template in a templates folder, and an
SMTP sink the detached workers send to."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask

from bulkmail.store import Store, open_store
from bulkmail.store.records import JobState
from bulkmail.web.auth import add_token
from bulkmail.web.dashboard import DashboardConfig, NamedSource, init_app
from tests.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CSV = REPO / "examples" / "instructors.csv"
SENDER = "Course Office <office@example.edu>"
SUBJECT = "Reminder: {{ course }}"


@dataclass
class Site:
    store: Store
    config: DashboardConfig
    app: Flask
    sender: str  # a sender token
    viewer: str  # a viewer token
    templates: Path

    def bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def smtp_environment(monkeypatch: pytest.MonkeyPatch, sink: SmtpSink) -> None:
    """The provider the web process plans with and its workers (which inherit the
    environment) send with: the sink, at no rate limit."""
    for key, value in {
        "BULKMAIL_PROVIDER": "smtp",
        "BULKMAIL_SMTP_HOST": sink.host,
        "BULKMAIL_SMTP_PORT": str(sink.port),
        "BULKMAIL_SMTP_SECURITY": "none",
        "BULKMAIL_FROM": SENDER,
        "BULKMAIL_RATE": "0",
    }.items():
        monkeypatch.setenv(key, value)


def make_site(tmp_path: Path, **overrides: object) -> Site:
    """A store, two tokens and a Flask app of our own with the dashboard registered."""
    store = open_store(tmp_path / "jobs.db")
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    shutil.copy(REPO / "examples" / "reminder.txt", templates / "reminder.txt")
    config = DashboardConfig(
        store=store,
        sources={"instructors": NamedSource(csv=str(EXAMPLE_CSV))},
        templates_dir=templates,
        **overrides,  # type: ignore[arg-type]
    )
    app = Flask(__name__)
    init_app(app, config)
    sender = add_token(store, "office", "sender")
    viewer = add_token(store, "auditor", "viewer")
    return Site(store, config, app, sender, viewer, templates)


def wait_finished(store: Store, job_id: int, timeout: float = 30.0) -> str:
    """The job's state once it is completed or cancelled (polled; the worker is real)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.view(job_id).job.state
        if state in (JobState.COMPLETED, JobState.CANCELLED, JobState.ABORTED):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is still {store.view(job_id).job.state}")
