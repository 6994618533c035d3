"""``--provider mailtrap`` end to end: the command line, the job store and the send loop
against a real HTTP server on loopback (pytest-httpserver) that checks every request the
way the sending API would, then the outcome read back with ``bulkmail report``."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from bulkmail import __version__
from tests.e2e import SENDER, bulkmail, data_dir, recent_jobs
from tests.mailtrap_schema import batch_problems, send_problems

TOKEN = "mt-e2e-token-7f3a9c0d5e1b2468"
PEOPLE = (
    "name,email,course\n"
    "Ada Lovelace,ada@example.edu,CS101\n"
    "Ben Okafor,ben@example.edu,CS102\n"
    "Bad,not-an-address,CS103\n"
    "Zoë Ångström,zoe@example.edu,PHYS210\n"
)
SHEETS = {"CS101": b"%PDF-1.4 \x00\xff one", "CS102": b"%PDF two \r\n", "PHYS210": b"%PDF \x80"}


class Api:
    """A stand-in for the Mailtrap sending API: checks each request, records it, answers
    200 with a message id unless ``plan`` says otherwise for that recipient (a list of
    (status, headers) consumed one per request)."""

    def __init__(self, httpserver: HTTPServer, token: str = TOKEN) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.plan: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.batches: list[dict[str, Any]] = []  # /api/batch documents, as received
        self.entry_errors: dict[str, list[str]] = {}  # address -> its entry's errors, once
        # the pre-flight check's empty batch: the token it accepts (the one sends need,
        # unless a test revokes it between the check and the sends)
        self.checked_token = token
        self.checks = 0
        httpserver.expect_request("/api/send", method="POST").respond_with_handler(self.handle)
        httpserver.expect_request("/api/batch", method="POST").respond_with_handler(self.batch)

    def batch(self, request: Request) -> Response:
        """A batch with requests is sent (``handle_batch``); an empty one is the pre-flight
        check (nothing to send): 401 for a wrong token, else 400 for the empty batch, as
        the API validates after authenticating."""
        body = json.loads(request.get_data())
        if body.get("requests"):
            return self.handle_batch(request)
        with self.lock:
            self.checks += 1
            if body != {"base": {}, "requests": []}:
                self.problems.append(f"the check sent a batch with content: {body}")
        if request.headers.get("Authorization") != f"Bearer {self.checked_token}":
            errors = {"success": False, "errors": ["Unauthorized"]}
            return Response(json.dumps(errors), 401, mimetype="application/json")
        errors = {"success": False, "errors": ["'requests' must not be empty"]}
        return Response(json.dumps(errors), 400, mimetype="application/json")

    def check(self, request: Request, body: dict[str, Any]) -> None:
        def expect(ok: bool, what: str) -> None:
            if not ok:
                self.problems.append(f"{what}: {request.headers} {body}")

        expect(request.headers.get("Authorization") == f"Bearer {self.token}", "token")
        expect(request.headers.get("User-Agent") == f"bulkmail/{__version__}", "user agent")
        expect(request.headers.get("Content-Type") == "application/json", "content type")
        expect(body.get("from") == {"email": "office@example.edu", "name": "Course Office"}, "from")
        to = body.get("to")
        expect(isinstance(to, list) and len(to) == 1 and set(to[0]) == {"email", "name"}, "to")
        for key in ("subject", "text", "html"):
            expect(isinstance(body.get(key), str) and bool(body[key]), key)
        expect(
            set(body.get("headers", {}))
            == {"Message-ID", "Auto-Submitted", "X-Auto-Response-Suppress"},
            "headers",
        )
        expect(body["headers"].get("Auto-Submitted") == "auto-generated", "auto-submitted")
        [attachment] = body.get("attachments") or [{}]
        expect(attachment.get("type") == "application/pdf", "attachment type")
        expect(attachment.get("disposition") == "attachment", "disposition")
        variables = body.get("custom_variables") or {}
        expect(set(variables) == {"bulkmail_job", "bulkmail_delivery"}, "custom_variables")
        expect(all(v.isdigit() for v in variables.values()), "custom_variables values")

    def handle(self, request: Request) -> Response:
        body = json.loads(request.get_data())
        with self.lock:
            self.check(request, body)
            self.problems += send_problems(body)
            n = len(self.seen) + 1
            self.seen.append({"body": body, "at": time.monotonic()})
            address = body["to"][0]["email"]
            planned = self.plan.get(address)
            if planned:
                status, headers = planned.pop(0)
                errors = {"errors": [f"planned {status}"]}
                return Response(json.dumps(errors), status, headers, mimetype="application/json")
        answer = {"success": True, "message_ids": [f"mt-{n}-{address}"]}
        return Response(json.dumps(answer), 200, mimetype="application/json")

    def handle_batch(self, request: Request) -> Response:
        """A batch: each entry checked as the message Mailtrap assembles (base, then the
        entry), answered entry by entry; a planned status for any of its recipients is the
        whole request's answer."""
        doc = json.loads(request.get_data())
        with self.lock:
            self.batches.append(doc)
            self.problems += batch_problems(doc)
            bodies = [{**doc.get("base", {}), **entry} for entry in doc["requests"]]
            for body in bodies:
                self.check(request, body)
            for body in bodies:
                planned = self.plan.get(body["to"][0]["email"])
                if planned:
                    status, headers = planned.pop(0)
                    errors = {"success": False, "errors": [f"planned {status}"]}
                    text = json.dumps(errors)
                    return Response(text, status, headers, mimetype="application/json")
            results: list[dict[str, Any]] = []
            for body in bodies:
                n = len(self.seen) + 1
                self.seen.append({"body": body, "at": time.monotonic()})
                address = body["to"][0]["email"]
                entry_errors = self.entry_errors.pop(address, None)
                if entry_errors:
                    results.append({"success": False, "errors": entry_errors})
                else:
                    results.append({"success": True, "message_ids": [f"mt-{n}-{address}"]})
        answer = {"success": all(r["success"] for r in results), "responses": results}
        return Response(json.dumps(answer), 200, mimetype="application/json")


def setup_files() -> None:
    Path("people.csv").write_text(PEOPLE, encoding="utf-8")
    Path("t.txt").write_text("Dear {{ name }},\ngrades for {{ course }}.\n", encoding="utf-8")
    Path("t.html").write_text("<p>Dear {{ name }}, grades for {{ course }}.</p>\n")
    Path("sheets").mkdir()
    for course, data in SHEETS.items():
        Path("sheets", f"{course}.pdf").write_bytes(data)


def mailtrap_env(httpserver: HTTPServer, token: str = TOKEN, batch_size: int = 1) -> dict[str, str]:
    return {
        "BULKMAIL_MAILTRAP_TOKEN": token,
        "BULKMAIL_MAILTRAP_API_URL": httpserver.url_for("/"),
        # 1: one /api/send per message (these tests' path); over 1: /api/batch
        "BULKMAIL_MAILTRAP_BATCH_SIZE": str(batch_size),
    }


def send(httpserver: HTTPServer, *extra: str, token: str = TOKEN, batch_size: int = 1) -> Any:
    return bulkmail(
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt",
        "--html-template", "t.html", "--attach", "sheets/{{ course }}.pdf",
        "--subject", "Grades: {{ course }}", "--provider", "mailtrap", "--from", SENDER,
        "--rate", "0", "--backoff", "0", "--json", *extra,
        env=mailtrap_env(httpserver, token, batch_size),
    )  # fmt: skip


def report(job: int = 1) -> dict[str, dict[str, str]]:
    result = bulkmail("report", str(job))
    assert result.exit_code == 0, result.output
    return {row["email"]: row for row in csv.DictReader(io.StringIO(result.stdout))}


def store_bytes() -> bytes:
    """Every file of the default store (the WAL and shared-memory files included)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir().glob("bulkmail.db*")))


def test_mailtrap_job_end_to_end(httpserver: HTTPServer) -> None:
    setup_files()
    api = Api(httpserver)
    result = send(httpserver)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["provider"], doc["sent"], doc["skipped"]) == (
        "completed",
        "mailtrap",
        3,
        1,
    )
    assert api.problems == []
    bodies = {s["body"]["to"][0]["email"]: s["body"] for s in api.seen}
    assert set(bodies) == {"ada@example.edu", "ben@example.edu", "zoe@example.edu"}
    zoe = bodies["zoe@example.edu"]
    assert zoe["to"] == [{"email": "zoe@example.edu", "name": "Zoë Ångström"}]
    assert zoe["subject"] == "Grades: PHYS210"
    assert zoe["text"] == "Dear Zoë Ångström,\ngrades for PHYS210.\n"
    assert zoe["html"] == "<p>Dear Zoë Ångström, grades for PHYS210.</p>\n"
    for address, body in bodies.items():
        [attachment] = body["attachments"]
        course = body["subject"].removeprefix("Grades: ")
        assert attachment["filename"] == f"{course}.pdf"
        assert base64.b64decode(attachment["content"]) == SHEETS[course], address

    rows = report()
    for address, body in bodies.items():
        row = rows[address]
        assert row["state"] == "sent" and row["attempts"] == "1"
        assert row["message_id"] == body["headers"]["Message-ID"]
        n = next(i for i, s in enumerate(api.seen, 1) if s["body"] is body)
        assert row["provider_message_id"] == f"mt-{n}-{address}"
    assert rows["not-an-address"]["state"] == "skipped"
    assert rows["not-an-address"]["provider_message_id"] == ""
    assert len({r["message_id"] for r in rows.values()}) == 4

    assert TOKEN.encode() not in store_bytes(), "the job store must never hold the token"


def test_rejected_token_aborts_with_every_delivery_pending_then_resume(
    httpserver: HTTPServer,
) -> None:
    setup_files()
    api = Api(httpserver, token="the-right-token")
    # a wrong token is refused by the pre-flight check, in one line: no job, nothing sent
    refused = send(httpserver, token="a-wrong-token")
    assert refused.exit_code == 3, refused.output
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "token rejected (401" in refused.stderr
    assert "127.0.0.1" in refused.stderr or "localhost" in refused.stderr
    assert (api.checks, api.seen) == (1, []) and recent_jobs() == []

    # a token that passes the check but is rejected at the first send (revoked meanwhile)
    api.checked_token = "a-wrong-token"
    api.plan["ada@example.edu"] = [(401, {})]
    result = send(httpserver, token="a-wrong-token")
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"], doc["pending"], doc["skipped"]) == ("aborted", 0, 3, 1)
    assert "Mailtrap rejected the API token (401)" in doc["error"]
    assert "bulkmail resume 1" in result.stderr
    assert len(api.seen) == 1, "nothing more is tried once the token is rejected"
    assert {r["state"] for e, r in report().items() if e != "not-an-address"} == {"pending"}
    assert b"a-wrong-token" not in store_bytes()

    # fixed in the environment: resume reads the secret again and finishes the job
    resumed = bulkmail("resume", "1", "--json", env=mailtrap_env(httpserver, "the-right-token"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["sent"] == 3
    assert {r["state"] for e, r in report().items() if e != "not-an-address"} == {"sent"}
    assert b"the-right-token" not in store_bytes()


def test_429_with_retry_after_is_retried_while_the_others_go_on(httpserver: HTTPServer) -> None:
    setup_files()
    api = Api(httpserver)
    api.plan["ada@example.edu"] = [(429, {"Retry-After": "1"})]
    result = send(httpserver)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 3
    order = [s["body"]["to"][0]["email"] for s in api.seen]
    # Ada first (refused), the others are not held up, then Ada again after Retry-After
    assert order == ["ada@example.edu", "ben@example.edu", "zoe@example.edu", "ada@example.edu"]
    assert api.seen[3]["at"] - api.seen[0]["at"] >= 0.9
    first, retry = (s["body"] for s in api.seen if s["body"]["to"][0]["email"] == "ada@example.edu")
    assert first["headers"]["Message-ID"] == retry["headers"]["Message-ID"]
    rows = report()
    assert rows["ada@example.edu"]["state"] == "sent"
    # a 429 throttles the account (Retry-After for every job on it) and gives the attempt
    # back: it does not use up one of Ada's retries (issue 12)
    assert rows["ada@example.edu"]["attempts"] == "1"
    assert rows["ada@example.edu"]["provider_message_id"] == "mt-4-ada@example.edu"
    assert rows["ben@example.edu"]["attempts"] == "1"


# --- batches: [mailtrap] batch_size over 1 sends through /api/batch ----------------------


def test_batch_job_end_to_end(httpserver: HTTPServer) -> None:
    setup_files()
    api = Api(httpserver)
    result = send(httpserver, batch_size=100)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"], doc["skipped"]) == ("completed", 3, 1)
    assert api.problems == []
    assert len(api.batches) == 1, "one request for the three messages"
    assert len(api.batches[0]["requests"]) == 3
    rows = report()
    delivery_ids = set()
    for n, seen in enumerate(api.seen, 1):
        body = seen["body"]
        address = body["to"][0]["email"]
        row = rows[address]
        assert (row["state"], row["attempts"]) == ("sent", "1")
        assert row["provider_message_id"] == f"mt-{n}-{address}"
        assert row["message_id"] == body["headers"]["Message-ID"]
        assert body["custom_variables"]["bulkmail_job"] == "1"
        delivery_ids.add(body["custom_variables"]["bulkmail_delivery"])
    assert len(delivery_ids) == 3


def test_batch_failed_entry_fails_alone(httpserver: HTTPServer) -> None:
    setup_files()
    api = Api(httpserver)
    api.entry_errors["ben@example.edu"] = ["'to' address is invalid"]
    result = send(httpserver, batch_size=100)
    assert result.exit_code != 3, result.output
    assert len(api.batches) == 1, "a failed entry never resends the batch"
    rows = report()
    assert rows["ben@example.edu"]["state"] == "failed"
    assert "'to' address is invalid" in rows["ben@example.edu"]["error"]
    assert {rows[a]["state"] for a in ("ada@example.edu", "zoe@example.edu")} == {"sent"}


def test_batch_403_aborts_with_every_delivery_pending(httpserver: HTTPServer) -> None:
    setup_files()
    api = Api(httpserver)
    api.plan["ada@example.edu"] = [(403, {})]
    result = send(httpserver, batch_size=100)
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["sent"], doc["pending"]) == ("aborted", 0, 3)
    assert "Mailtrap refused to send (403): planned 403" in doc["error"]
    assert len(api.batches) == 1
    rows = report()
    assert {r["state"] for e, r in rows.items() if e != "not-an-address"} == {"pending"}
    assert {r["attempts"] for e, r in rows.items() if e != "not-an-address"} == {"0"}


def test_batch_500_leaves_all_in_doubt_then_resends_with_the_same_ids(
    httpserver: HTTPServer,
) -> None:
    setup_files()
    api = Api(httpserver)
    api.plan["zoe@example.edu"] = [(500, {"Retry-After": "0"})]
    result = send(httpserver, batch_size=100)
    assert result.exit_code == 0, result.output
    assert [len(b["requests"]) for b in api.batches] == [3, 3]
    first, second = (
        [r["headers"]["Message-ID"] for r in batch["requests"]] for batch in api.batches
    )
    assert sorted(first) == sorted(second)
    rows = report()
    for address in ("ada@example.edu", "ben@example.edu", "zoe@example.edu"):
        assert (rows[address]["state"], rows[address]["attempts"]) == ("sent", "2")


def test_batch_size_over_500_and_a_bad_inbox_id_are_exit_2(httpserver: HTTPServer) -> None:
    setup_files()
    result = send(httpserver, batch_size=501)
    assert result.exit_code == 2, result.output
    assert "batch_size" in result.output
    env = {**mailtrap_env(httpserver), "BULKMAIL_MAILTRAP_INBOX_ID": "inbox-7"}
    result = bulkmail(
        "send-reminders", "--csv", "people.csv", "--template", "t.txt", "--subject", "S",
        "--provider", "mailtrap", "--from", SENDER, "--json", env=env,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "inbox_id must be a positive integer" in result.output
