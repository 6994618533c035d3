"""The HTTP API through Flask's test client: answers in the shapes of --json, the CLI's
one-line errors, permissions for every endpoint and role, CSRF on every form, the OpenAPI
description against real answers. Jobs are sent by real detached workers to an SMTP sink."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from bulkmail.web.dashboard import openapi
from bulkmail.web.dashboard.security import CHECK, CURRENT_USER
from tests.dashboard_helpers import (
    EXAMPLE_CSV,
    REPO,
    SUBJECT,
    Site,
    make_site,
    smtp_environment,
    wait_finished,
)
from tests.smtp_sink import SmtpSink

API = "/api/bulk-email"
THREE = ["ada.whitfield@example.edu", "b.okafor@example.edu", "priya.raman@example.edu"]


@pytest.fixture
def site(tmp_path: Path, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    smtp_environment(monkeypatch, smtp_sink)
    s = make_site(tmp_path)
    yield s
    s.store.close()


@pytest.fixture
def client(site: Site) -> FlaskClient:
    return site.app.test_client()


def send_form(**extra: Any) -> dict[str, Any]:
    return {"source": "instructors", "template": "reminder.txt", "subject": SUBJECT, **extra}


def test_a_sender_sends_to_the_selected_three_in_a_worker(
    site: Site, client: FlaskClient, smtp_sink: SmtpSink
) -> None:
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(selected=THREE),
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 202, answer.json
    body = answer.json
    assert body is not None
    job_id = body["job_id"]
    assert body["status_url"] == f"{API}/job-status/{job_id}"
    assert answer.headers["Location"] == body["status_url"]
    assert body["job"]["created_by"] == "office" and body["job"]["worker_pid"]
    assert wait_finished(site.store, job_id) == "completed"
    assert sorted(r for m in smtp_sink.messages for r in m.rcpt_tos) == sorted(THREE)
    status = client.get(body["status_url"], headers=site.bearer(site.viewer)).json
    assert status is not None
    assert (status["state"], status["sent"], status["total"]) == ("completed", 3, 3)
    # the report, as `bulkmail report`
    report = client.get(f"{API}/jobs/{job_id}/report", headers=site.bearer(site.viewer))
    assert report.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(report.get_data(as_text=True))))
    assert sorted(r["email"] for r in rows) == sorted(THREE)
    assert {r["state"] for r in rows} == {"sent"}


def test_an_uploaded_csv_and_template_text_in_a_multipart_form(
    site: Site, client: FlaskClient
) -> None:
    data = {
        "csv": (io.BytesIO(EXAMPLE_CSV.read_bytes()), "instructors.csv"),
        "template_text": "Hello {{ name }}, grades for {{ course }} please.",
        "subject": SUBJECT,
        "selected": ["chen.wei@example.edu"],
    }
    answer = client.post(
        f"{API}/send-instructor-reminders",
        data=data,
        content_type="multipart/form-data",
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 202, answer.json
    assert answer.json is not None
    job = site.store.get_job(answer.json["job_id"])
    assert job.source == "upload instructors.csv"
    assert job.templates["text_name"] == "template_text"
    assert wait_finished(site.store, job.id) == "completed"


def cli_error(*args: str) -> str:
    """The one line `bulkmail send-reminders --dry-run` prints for the same mistake."""
    done = subprocess.run(
        [sys.executable, "-m", "bulkmail", "send-reminders", "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr.strip().removeprefix("bulkmail: ")


@pytest.mark.parametrize(
    ("fields", "cli_args"),
    [
        (
            {"subject": "Reminder: {{ cours }}"},
            ["--subject", "Reminder: {{ cours }}"],
        ),
        (
            {"selected": ["nobody@example.edu"]},
            ["--only", "nobody@example.edu"],
        ),
        ({"rate": "-1"}, ["--rate", "-1"]),
    ],
)
def test_bad_input_is_400_with_the_clis_line_and_nothing_created(
    site: Site, client: FlaskClient, fields: dict[str, Any], cli_args: list[str]
) -> None:
    template = site.templates / "reminder.txt"
    args = ["--csv", str(EXAMPLE_CSV), "--template", str(template), "--subject", SUBJECT]
    expected = cli_error(*args, *cli_args)
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(**fields),
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 400
    assert answer.json == {"error": expected}
    assert site.store.recent(10) == []


def test_more_bad_input_named_for_the_web(site: Site, client: FlaskClient) -> None:
    headers = site.bearer(site.sender)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"source": "nope"}, "source 'nope': no such source (known: instructors)"),
        ({"template": "../etc/passwd"}, "template '../etc/passwd': no such template"),
        ({"selected": []}, "selected: no recipient selected"),
        ({"rate": "fast"}, "--rate: must be a number, got 'fast'"),
    ]
    for fields, message in cases:
        answer = client.post(
            f"{API}/send-instructor-reminders", json=send_form(**fields), headers=headers
        )
        assert answer.status_code == 400
        assert answer.json is not None and answer.json["error"].startswith(message)
    upload = {
        "csv": (io.BytesIO(b"name,mail\nA,a@x.org\n"), "list.csv"),
        "template": "reminder.txt",
    }
    answer = client.post(
        f"{API}/send-instructor-reminders",
        data={**upload, "subject": "Hi"},
        content_type="multipart/form-data",
        headers=headers,
    )
    assert answer.status_code == 400
    assert answer.json is not None and answer.json["error"].startswith("list.csv:")
    assert "bulkmail-web-" not in answer.json["error"]  # no temporary path shown
    assert site.store.recent(10) == []


def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    site = make_site(tmp_path, max_body=2000)
    answer = site.app.test_client().post(
        f"{API}/send-instructor-reminders",
        data={"csv": (io.BytesIO(b"x" * 5000), "big.csv"), "subject": "s"},
        content_type="multipart/form-data",
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 413
    assert answer.json == {"error": "request body too large: at most 0 MB"} or (
        answer.json is not None and answer.json["error"].startswith("request body too large")
    )
    site.store.close()


def test_unknown_job_is_404_and_recent_jobs_as_recent_json(site: Site, client: FlaskClient) -> None:
    headers = site.bearer(site.viewer)
    answer = client.get(f"{API}/job-status/99", headers=headers)
    assert answer.status_code == 404
    assert answer.json == {"error": "no job 99 in the store (see `bulkmail recent`)"}
    assert client.get(f"{API}/recent-jobs?limit=5", headers=headers).json == []
    assert client.get(f"{API}/recent-jobs?limit=x", headers=headers).status_code == 400


def test_recipients_and_preview_for_the_page(site: Site, client: FlaskClient) -> None:
    headers = site.bearer(site.viewer)
    plan = client.post(f"{API}/recipients", json=send_form(), headers=headers).json
    assert plan is not None
    assert plan["total"] == 12 and plan["to_send"] == 12 and len(plan["recipients"]) == 12
    message = client.post(
        f"{API}/preview", json=send_form(email="chen.wei@example.edu"), headers=headers
    ).json
    assert message is not None
    assert message["subject"] == "Reminder: CHEM110"
    assert message["to"] == "Chen Wei <chen.wei@example.edu>"
    assert "final grades for CHEM110 are due on 2025-09-12" in message["text"]


def test_cancel_resume_retry_answer_job_documents(site: Site, client: FlaskClient) -> None:
    headers = site.bearer(site.sender)
    started = client.post(
        f"{API}/send-instructor-reminders", json=send_form(selected=THREE[:1]), headers=headers
    ).json
    assert started is not None
    job_id = started["job_id"]
    wait_finished(site.store, job_id)
    resumed = client.post(f"{API}/jobs/{job_id}/resume", headers=headers)
    assert resumed.status_code == 200 and resumed.json is not None
    assert resumed.json["state"] == "completed"
    retried = client.post(f"{API}/jobs/{job_id}/retry", headers=headers)
    assert retried.status_code == 200
    cancelled = client.post(f"{API}/jobs/{job_id}/cancel", headers=headers)
    assert cancelled.status_code == 409
    assert cancelled.json is not None and "completed" in cancelled.json["error"]


# --------------------------------------------------------------------------- permissions

ENDPOINTS = [
    ("POST", f"{API}/send-instructor-reminders", "sender"),
    ("POST", f"{API}/recipients", "viewer"),
    ("POST", f"{API}/preview", "viewer"),
    ("GET", f"{API}/job-status/1", "viewer"),
    ("GET", f"{API}/recent-jobs", "viewer"),
    ("GET", f"{API}/sources", "viewer"),
    ("POST", f"{API}/jobs/1/cancel", "sender"),
    ("POST", f"{API}/jobs/1/resume", "sender"),
    ("POST", f"{API}/jobs/1/retry", "sender"),
    ("GET", f"{API}/jobs/1/report", "viewer"),
]


@pytest.mark.parametrize(("method", "path", "role"), ENDPOINTS)
def test_every_endpoint_checks_the_token_and_its_role(
    site: Site, client: FlaskClient, method: str, path: str, role: str
) -> None:
    def call(headers: dict[str, str]) -> int:
        return client.open(path, method=method, json={}, headers=headers).status_code

    assert call({}) == 401
    assert call({"Authorization": "Bearer bm_not-a-token"}) == 401
    assert call({"Authorization": "Basic b2ZmaWNlOng="}) == 401
    if role == "sender":
        assert call(site.bearer(site.viewer)) == 403
    else:
        assert call(site.bearer(site.viewer)) not in (401, 403)
    assert call(site.bearer(site.sender)) not in (401, 403)
    # a removed token is refused from then on
    site.store.remove_token("auditor")
    assert call(site.bearer(site.viewer)) == 401


def login(client: FlaskClient, token: str) -> str:
    page = client.get("/dashboard/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    answer = client.post("/dashboard/login", data={"token": token, "csrf_token": csrf[1]})
    assert answer.status_code == 302, answer.get_data(as_text=True)
    page = client.get("/dashboard/").get_data(as_text=True)
    meta = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert meta is not None
    return meta[1]


def test_the_session_cookie_is_httponly_and_samesite_strict(site: Site) -> None:
    client = site.app.test_client()
    answer = client.get("/dashboard/login")
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_csrf_is_checked_on_every_form_and_api_call_of_a_session(site: Site) -> None:
    client = site.app.test_client()
    # the login form: no token, or another session's, is refused
    client.get("/dashboard/login")
    refused = client.post("/dashboard/login", data={"token": site.sender})
    assert refused.status_code == 403
    csrf = login(client, site.sender)
    # the session's API calls that change something need the token
    path = f"{API}/send-instructor-reminders"
    assert client.post(path, json=send_form()).status_code == 403
    assert client.post(path, json=send_form(), headers={"X-CSRF-Token": "wrong"}).status_code == 403
    for action in ("cancel", "resume", "retry"):
        assert client.post(f"{API}/jobs/1/{action}").status_code == 403
    # a read needs none; a change with the token goes through (404: there is no job 1)
    assert client.get(f"{API}/recent-jobs").status_code == 200
    assert client.post(f"{API}/jobs/1/cancel", headers={"X-CSRF-Token": csrf}).status_code == 404
    # the logout form
    assert client.post("/dashboard/logout").status_code == 403
    assert client.post("/dashboard/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.get(f"{API}/recent-jobs").status_code == 401


def test_pages_need_a_login_and_removing_the_token_ends_the_session(site: Site) -> None:
    client = site.app.test_client()
    answer = client.get("/dashboard/new")
    assert answer.status_code == 302 and "/dashboard/login" in answer.headers["Location"]
    wrong = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', wrong.get_data(as_text=True))
    assert csrf is not None
    bad = client.post("/dashboard/login", data={"token": "bm_wrong", "csrf_token": csrf[1]})
    assert bad.status_code == 401 and "Unknown or revoked token." in bad.get_data(as_text=True)
    login(client, site.viewer)
    page = client.get("/dashboard/new").get_data(as_text=True)
    assert "instructors" in page and "reminder.txt" in page
    assert "sending needs a sender token" in page
    site.store.remove_token("auditor")
    assert client.get("/dashboard/").status_code == 302


def test_the_host_apps_permission_hook(site: Site) -> None:
    allowed: set[str] = {"viewer"}
    site.app.config[CHECK] = lambda role: role in allowed
    site.app.config[CURRENT_USER] = lambda: "alice"
    client = site.app.test_client()
    assert client.get(f"{API}/recent-jobs").status_code == 200
    assert client.get("/dashboard/").status_code == 200
    page = client.get("/dashboard/").get_data(as_text=True)
    meta = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert meta is not None
    path = f"{API}/send-instructor-reminders"
    headers = {"X-CSRF-Token": meta[1]}
    assert client.post(path, json=send_form(), headers=headers).status_code == 403
    allowed.add("sender")
    assert client.post(path, json=send_form(selected=THREE[:1])).status_code == 403  # CSRF
    answer = client.post(path, json=send_form(selected=THREE[:1]), headers=headers)
    assert answer.status_code == 202 and answer.json is not None
    assert answer.json["job"]["created_by"] == "alice"
    wait_finished(site.store, answer.json["job_id"])


# --------------------------------------------------------------------------- OpenAPI


def check(schema: dict[str, Any], value: Any, components: dict[str, Any], where: str) -> None:
    """``value`` has every required key of ``schema`` and the types it says (a small
    subset of JSON Schema: what the description uses)."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    python: dict[str, type | tuple[type, ...]] = {
        "object": dict, "array": list, "string": str, "integer": int,
        "number": (int, float), "boolean": bool, "null": type(None),
    }  # fmt: skip
    if kinds:
        assert any(isinstance(value, python[k]) for k in kinds), f"{where}: {value!r} not {kinds}"
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            assert key in value, f"{where}: {key!r} missing"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                check(sub, value[key], components, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            check(schema["items"], item, components, f"{where}[{n}]")


def test_the_openapi_description_matches_real_answers(site: Site, client: FlaskClient) -> None:
    doc = client.get(f"{API}/openapi.json").json
    assert doc is not None and doc == json.loads(json.dumps(openapi.document()))
    components, paths = doc["components"]["schemas"], doc["paths"]
    assert set(doc["components"]["schemas"]["JobDocument"]["required"]) >= {"id", "state", "sent"}

    def schema(path: str, method: str, status: str) -> dict[str, Any]:
        response = paths[path][method]["responses"][status]
        media = response["content"]
        return dict(next(iter(media.values()))["schema"])

    sender, viewer = site.bearer(site.sender), site.bearer(site.viewer)
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(selected=THREE[:2], name="OpenAPI check"),
        headers=sender,
    )
    path = "/api/bulk-email/send-instructor-reminders"
    check(schema(path, "post", "202"), answer.json, components, "202")
    assert answer.json is not None
    job_id = answer.json["job_id"]
    assert answer.json["job"]["name"] == "OpenAPI check"
    wait_finished(site.store, job_id)
    bad = client.post(
        f"{API}/send-instructor-reminders", json=send_form(source="x"), headers=sender
    )
    check(schema(path, "post", "400"), bad.json, components, "400")
    for url, key, status in [
        (f"{API}/job-status/{job_id}?failed=1", "/api/bulk-email/job-status/{job_id}", "200"),
        (f"{API}/job-status/999", "/api/bulk-email/job-status/{job_id}", "404"),
        (f"{API}/recent-jobs?limit=3", "/api/bulk-email/recent-jobs", "200"),
    ]:
        got = client.get(url, headers=viewer)
        assert got.status_code == int(status)
        check(schema(key, "get", status), got.json, components, url)
    assert client.get(f"{API}/recent-jobs", headers={}).status_code == 401
    got = client.post(f"{API}/recipients", json=send_form(), headers=viewer)
    check(schema("/api/bulk-email/recipients", "post", "200"), got.json, components, "recipients")
    got = client.post(f"{API}/preview", json=send_form(email=THREE[0]), headers=viewer)
    check(schema("/api/bulk-email/preview", "post", "200"), got.json, components, "preview")
    got = client.get(f"{API}/sources", headers=viewer)
    check(schema("/api/bulk-email/sources", "get", "200"), got.json, components, "sources")
    # every field a request may give is described (the list and the HTML/attachments)
    body = paths[path]["post"]["requestBody"]["content"]
    for media in ("multipart/form-data", "application/json"):
        assert set(body[media]["schema"]["properties"]) >= {
            "csv", "source", "template", "template_text", "html_template",
            "html_template_text", "attach", "subject", "selected", "rate", "name",
            "dedupe_key", "per_hour", "per_day", "window", "tz", "not_before", "not_after",
        }  # fmt: skip
    got = client.post(f"{API}/jobs/{job_id}/resume", headers=sender)
    check(schema("/api/bulk-email/jobs/{job_id}/resume", "post", "200"), got.json, components, "r")
    for template in paths:  # every route the blueprint serves is described, and no other
        assert template.startswith("/api/bulk-email/")
    rules = {
        re.sub(r"<int:(\w+)>", r"{\1}", r.rule)
        for r in site.app.url_map.iter_rules()
        if r.rule.startswith(API) and not r.rule.endswith("openapi.json")
    }
    assert rules == set(paths)


def test_the_example_host_app_uses_its_own_permission_check(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.flask_admin_app import create_app

    monkeypatch.setenv("BULKMAIL_STORE", site.store.location)
    app = create_app()
    client = app.test_client()
    assert client.get(f"{API}/recent-jobs").status_code == 403  # nobody logged in
    with client.session_transaction() as session:
        session["admin_role"] = "staff"
    assert client.get(f"{API}/recent-jobs").status_code == 200
    page = client.get("/dashboard/new").get_data(as_text=True)
    meta = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert meta is not None
    headers = {"X-CSRF-Token": meta[1]}
    path = f"{API}/send-instructor-reminders"
    assert client.post(path, json=send_form(), headers=headers).status_code == 403


def test_token_add_prints_the_token_once_list_and_remove(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bulkmail.cli import app
    from bulkmail.store import open_store
    from bulkmail.web.auth import authenticate, hash_token

    runner = CliRunner()
    store = str(tmp_path / "t.db")
    missing = runner.invoke(app, ["serve", "token", "add", "office", "--store", store])
    assert missing.exit_code == 2 and "no job store" in missing.output
    assert "to start one there, add --new-store" in missing.output
    serving = runner.invoke(app, ["serve", "--store", store])  # a new server says how to begin
    assert serving.exit_code == 2 and "--role sender --new-store" in serving.output
    made = runner.invoke(
        app,
        ["serve", "token", "add", "office", "--role", "sender", "--new-store", "--store", store],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    db = open_store(store)
    who = authenticate(db, token)
    assert who is not None and (who.name, who.role) == ("office", "sender")
    assert token not in (tmp_path / "t.db").read_bytes().decode("latin-1")
    assert hash_token(token) in {t.token_hash for t in db.tokens()}
    listed = runner.invoke(app, ["serve", "token", "list", "--json", "--store", store])
    assert [(t["name"], t["role"]) for t in json.loads(listed.stdout)] == [("office", "sender")]
    bad = runner.invoke(app, ["serve", "token", "add", "x", "--role", "admin", "--store", store])
    assert bad.exit_code == 2 and "--role: must be one of viewer, sender" in bad.output
    assert (
        runner.invoke(app, ["serve", "token", "remove", "office", "--store", store]).exit_code == 0
    )
    assert authenticate(db, token) is None
    gone = runner.invoke(app, ["serve", "token", "remove", "office", "--store", store])
    assert gone.exit_code == 2 and "no token named 'office'" in gone.output
    db.close()


# --------------------------------------------------------------------------- every field


def _cancel_and_wait(site: Site, client: FlaskClient, job_id: int) -> None:
    """A job held back (a window, --not-before) is cancelled, so its worker ends."""
    client.post(f"{API}/jobs/{job_id}/cancel", headers=site.bearer(site.sender))
    wait_finished(site.store, job_id)


FUTURE = {"not_before": "2099-01-05T08:00", "tz": "UTC"}  # the worker waits: cancelled after


@pytest.mark.parametrize(
    ("fields", "document", "record"),
    [
        ({"name": "Autumn grades"}, {"name": "Autumn grades"}, {"name": "Autumn grades"}),
        ({"dedupe_key": "autumn-2025"}, {"dedupe_key": "autumn-2025"}, {}),
        ({"rate": "2.5", "burst": "4"}, {"rate": 2.5, "burst": 4}, {}),
        ({"per_hour": "30", **FUTURE}, {"per_hour": 30}, {"per_hour": 30}),
        ({"per_day": "100", **FUTURE}, {"per_day": 100}, {"per_day": 100}),
        (
            {"window": ["Mon-Fri 08:00-18:00", "Sat 09:00-12:00"], **FUTURE},
            {"tz": "UTC", "windows": ["Mon-Fri 08:00-18:00", "Sat 09:00-12:00"]},
            {"windows": ("Mon-Fri 08:00-18:00", "Sat 09:00-12:00")},
        ),
        (
            {"tz": "Europe/Berlin", "not_after": "2099-01-01T08:00"},
            {"tz": "Europe/Berlin", "not_after": "2099-01-01T07:00:00Z"},
            {},
        ),
        (FUTURE, {"not_before": "2099-01-05T08:00:00Z", "tz": "UTC"}, {}),
        ({"max_retries": "0"}, {}, {"max_retries": 0}),
        ({"selected": THREE}, {"total": 3}, {}),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) and v and "name" not in v else None,
)
def test_every_sending_field_reaches_the_job(
    site: Site,
    client: FlaskClient,
    fields: dict[str, Any],
    document: dict[str, Any],
    record: dict[str, Any],
) -> None:
    form = send_form(**fields)
    form.setdefault("selected", THREE[:1])
    answer = client.post(
        f"{API}/send-instructor-reminders", json=form, headers=site.bearer(site.sender)
    )
    assert answer.status_code == 202, answer.json
    assert answer.json is not None
    job_id = answer.json["job_id"]
    status = client.get(f"{API}/job-status/{job_id}", headers=site.bearer(site.viewer)).json
    assert status is not None
    assert {key: status[key] for key in document} == document
    job = site.store.get_job(job_id)
    assert {key: getattr(job, key) for key in record} == record
    if "not_before" in fields or "window" in fields:
        _cancel_and_wait(site, client, job_id)
    else:
        assert wait_finished(site.store, job_id) == "completed"


def test_repeated_fields_of_a_multipart_form(site: Site, client: FlaskClient) -> None:
    data = {
        **send_form(),
        "name": "Weekday reminders",
        "window": ["Mon-Fri 08:00-18:00", "Sat 09:00-12:00"],
        "selected": THREE[:2],
        **FUTURE,
    }
    answer = client.post(
        f"{API}/send-instructor-reminders",
        data=data,
        content_type="multipart/form-data",
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 202, answer.json
    assert answer.json is not None
    job = site.store.get_job(answer.json["job_id"])
    assert job.windows == ("Mon-Fri 08:00-18:00", "Sat 09:00-12:00")
    assert (job.name, answer.json["job"]["name"]) == ("Weekday reminders", "Weekday reminders")
    assert answer.json["job"]["total"] == 2
    _cancel_and_wait(site, client, job.id)


def test_a_bad_name_gets_the_clis_line(site: Site, client: FlaskClient) -> None:
    template = site.templates / "reminder.txt"
    args = ["--csv", str(EXAMPLE_CSV), "--template", str(template), "--subject", SUBJECT]
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(name="x" * 201),
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 400
    assert answer.json == {"error": cli_error(*args, "--name", "x" * 201)}
    assert site.store.recent(10) == []


# --------------------------------------------------------------------------- HTML, attachments

HTML = "<p>Dear {{ name }},</p><p>grades for <b>{{ course }}</b> please.</p>"


@pytest.fixture
def attachments(site: Site) -> Path:
    folder = site.templates.parent / "attachments"
    folder.mkdir()
    (folder / "policy.pdf").write_bytes(b"%PDF-1.4 grading policy\n")
    (folder / "CS101.txt").write_text("CS101 rubric\n")
    (folder / "CHEM110.txt").write_text("CHEM110 rubric\n")
    site.config.attachments_dir = folder
    (site.templates / "reminder.html").write_text(HTML)
    return folder


def test_an_html_template_and_attachments_reach_the_message(
    site: Site, client: FlaskClient, smtp_sink: SmtpSink, attachments: Path
) -> None:
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(
            html_template="reminder.html",
            attach=["policy.pdf", "{{ course }}.txt"],
            selected=["chen.wei@example.edu"],
        ),
        headers=site.bearer(site.sender),
    )
    assert answer.status_code == 202, answer.json
    assert answer.json is not None
    job = site.store.get_job(answer.json["job_id"])
    assert job.templates["html"] == HTML
    assert wait_finished(site.store, job.id) == "completed"
    (received,) = smtp_sink.messages
    message = received.parse()
    html = message.get_body(("html",))
    assert html is not None and "<b>CHEM110</b>" in html.get_content()
    files = {part.get_filename(): part.get_content() for part in message.iter_attachments()}
    assert files == {"policy.pdf": b"%PDF-1.4 grading policy\n", "CHEM110.txt": "CHEM110 rubric\n"}


def test_the_preview_has_the_html_part_and_the_attachment_names(
    site: Site, client: FlaskClient, attachments: Path
) -> None:
    message = client.post(
        f"{API}/preview",
        json=send_form(
            html_template_text="<p>Hi {{ name }}</p><script>alert(1)</script>",
            attach=["policy.pdf", "{{ course }}.txt"],
            email="chen.wei@example.edu",
        ),
        headers=site.bearer(site.viewer),
    ).json
    assert message is not None
    assert message["html"] == "<p>Hi Chen Wei</p><script>alert(1)</script>"
    assert message["attachments"] == ["policy.pdf", "CHEM110.txt"]
    choices = client.get(f"{API}/sources", headers=site.bearer(site.viewer)).json
    assert choices == {
        "sources": ["instructors"],
        "templates": ["reminder.html", "reminder.txt"],
        "attachments": ["CHEM110.txt", "CS101.txt", "policy.pdf"],
    }


def test_attachments_are_names_in_the_folder_never_paths(
    site: Site, client: FlaskClient, attachments: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for mail")
    headers = site.bearer(site.sender)
    (attachments / "notes.txt").symlink_to(secret)  # a link planted in the folder
    not_a_path = "a file name of the attachments folder, not a path (no '/', no leading '.')"
    cases = [
        (["../secret.txt"], f"attach '../secret.txt': {not_a_path}"),
        ([str(secret)], f"attach {str(secret)!r}: {not_a_path}"),
        # a pattern whose literal part leads out of the folder (found in review: it used to
        # attach ../secret.txt), and a hidden file reached through a pattern
        (["../secret.txt{{ '' }}"], f"attach \"../secret.txt{{{{ '' }}}}\": {not_a_path}"),
        ([".{{ 'env' }}"], not_a_path),
        (["notes.txt"], "'notes.txt', a link to"),
        (["notes{{ '.txt' }}"], "a link to"),
        # (a value from the data that leads out is refused as it renders: tests/test_compose)
        (["{{ '../secret' }}.txt"], f"attach \"{{{{ '../secret' }}}}.txt\": {not_a_path}"),
        (["missing-{{ course }}.pdf"], "row 2: attachment 'missing-CS101.pdf' not found"),
    ]
    for attach, message in cases:
        answer = client.post(
            f"{API}/send-instructor-reminders", json=send_form(attach=attach), headers=headers
        )
        assert answer.status_code == 400, answer.json
        assert answer.json is not None
        assert message in answer.json["error"], answer.json["error"]
        assert str(attachments) not in answer.json["error"]
        assert "{% raw %}" not in answer.json["error"]
    answer = client.post(
        f"{API}/send-instructor-reminders",
        json=send_form(html_template="reminder.html", html_template_text="<p>x</p>"),
        headers=headers,
    )
    assert answer.status_code == 400 and answer.json is not None
    assert answer.json["error"].startswith("give at most one HTML template")
    site.config.attachments_dir = None
    answer = client.post(
        f"{API}/send-instructor-reminders", json=send_form(attach=["x.pdf"]), headers=headers
    )
    assert answer.json == {"error": "attach: no attachments folder is configured on the server"}
    assert site.store.recent(10) == []


def test_a_template_from_a_request_cannot_reach_python(site: Site, client: FlaskClient) -> None:
    """Template text and the subject come from the client: Jinja2 runs them sandboxed, so
    a sender token is not a shell on the server."""
    headers = site.bearer(site.sender)
    for fields in (
        {"template": None, "template_text": "{{ cycler.__init__.__globals__.os.getpid() }}"},
        {"subject": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
    ):
        form = {k: v for k, v in send_form(**fields).items() if v is not None}
        answer = client.post(f"{API}/send-instructor-reminders", json=form, headers=headers)
        assert answer.status_code == 400, answer.json
        assert answer.json is not None and "unsafe" in answer.json["error"], answer.json
    assert site.store.recent(10) == []


def test_a_template_from_a_request_cannot_take_the_servers_memory(
    site: Site, client: FlaskClient
) -> None:
    """Found in review: the sandbox blocked Python's internals but not `'x' * 10**10`;
    a request (even a viewer's preview) could take the server's memory. Each is refused
    at once with the CLI's one line; a reasonable * or ** still works."""
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    for text, message in (
        ("{{ 'x' * 10**10 }}", "'*' would make 10,000,000,000 items (at most 1,000,000)"),
        ("{{ [0] * 2000000 }}", "'*' would make 2,000,000 items"),
        ("{{ 9 ** 9999 }}", "'**' with an exponent of 9999 is refused"),
        (loops, "template_text renders over 10,000,000 characters"),
    ):
        fields = send_form(template=None, template_text=text, email=THREE[0])
        form = {k: v for k, v in fields.items() if v}
        started = time.monotonic()
        answer = client.post(f"{API}/preview", json=form, headers=site.bearer(site.viewer))
        assert time.monotonic() - started < 20
        assert answer.status_code == 400 and answer.json is not None, answer.json
        assert message in answer.json["error"] and "\n" not in answer.json["error"]
    fields = send_form(template=None, template_text="{{ '-' * 20 }} {{ 2 ** 10 }}", email=THREE[0])
    form = {k: v for k, v in fields.items() if v}
    answer = client.post(f"{API}/preview", json=form, headers=site.bearer(site.viewer))
    assert answer.status_code == 200, answer.json
    assert answer.json is not None and "-------------------- 1024" in answer.json["text"]


def _course_db(tmp_path: Path) -> str:
    path = tmp_path / "course.db"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_course_db.py"), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return f"sqlite:///{path}"


def test_recheck_from_the_api_records_the_query_and_its_worker_sends(
    tmp_path: Path, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recheck` (as --recheck) with a configured course-database source: the job records
    the server's query, a real worker runs it again and sends; with a CSV source it is the
    CLI's one line and nothing is created; a value that is not yes/no is named."""
    from bulkmail.web.dashboard.core import NamedSource

    smtp_environment(monkeypatch, smtp_sink)
    query = (
        "SELECT i.name, i.email, c.code AS course, c.starts_on AS due_date FROM instructors i"
        " JOIN courses c ON c.instructor_id = i.id WHERE i.id <= 2"
    )
    site = make_site(tmp_path)
    site.config.sources = {
        **site.config.sources,
        "course": NamedSource(db=_course_db(tmp_path), query=query),
    }
    client = site.app.test_client()
    try:
        sender = site.bearer(site.sender)
        form = {**send_form(), "source": "course", "recheck": True}
        answer = client.post(f"{API}/send-instructor-reminders", json=form, headers=sender)
        assert answer.status_code == 202, answer.json
        assert answer.json is not None
        assert answer.json["job"]["recheck"] is True
        job = site.store.get_job(answer.json["job_id"])
        assert job.recheck_query == query
        assert job.recheck_url == f"sqlite:///{tmp_path / 'course.db'}"
        assert wait_finished(site.store, job.id) == "completed"
        assert sorted(r for m in smtp_sink.messages for r in m.rcpt_tos) == [
            "ada.whitfield@example.edu",
            "b.okafor@example.edu",
        ]
        csv_form = {**send_form(), "recheck": "on"}
        refused = client.post(f"{API}/send-instructor-reminders", json=csv_form, headers=sender)
        assert refused.status_code == 400 and refused.json is not None
        assert "--recheck" in refused.json["error"] and "\n" not in refused.json["error"]
        odd = client.post(
            f"{API}/send-instructor-reminders",
            json={**form, "recheck": "maybe"},
            headers=sender,
        )
        assert odd.status_code == 400 and odd.json is not None
        assert odd.json["error"] == "--recheck: must be true or false, got 'maybe'"
        assert [v.job.id for v in site.store.recent(10)] == [job.id]
    finally:
        site.store.close()


def test_a_worker_for_a_recheck_job_gets_the_password_from_the_configured_source(
    tmp_path: Path,
) -> None:
    """The job keeps the URL without its password; the worker the dashboard starts gets
    the configured source's URL (with it) in its environment, never a foreign one."""
    from bulkmail.web.dashboard.core import NamedSource, _worker_env
    from tests.test_store import new_job, people

    site = make_site(tmp_path)
    try:
        job_id = site.store.create_job(
            new_job(
                recheck_url="postgresql://reader:***@db.example.edu/courses",
                recheck_query="SELECT name, email FROM due",
            ),
            people(1),
            now=1.0,
            domain="example.edu",
        )
        site.config.sources = {
            "other": NamedSource(db="postgresql://reader:x@elsewhere/courses", query="q"),
            "courses": NamedSource(
                db="postgresql://reader:s3cret@db.example.edu/courses", query="q"
            ),
        }
        env = _worker_env(site.config, job_id)
        assert env["BULKMAIL_DB"] == "postgresql://reader:s3cret@db.example.edu/courses"
        site.config.sources = {"other": site.config.sources["other"]}
        assert "BULKMAIL_DB" not in _worker_env(site.config, job_id)
    finally:
        site.store.close()
