"""MailtrapProvider's batch path (``POST /api/batch``) and the checks of issue 13 against a
real local HTTP server (pytest-httpserver) answering with the bodies Mailtrap's OpenAPI
file documents; every request body is validated against that file's schemas
(tests/mailtrap_schema.py). Nothing in requests is mocked."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from bulkmail.config import MailtrapSettings
from bulkmail.errors import ConfigError
from bulkmail.models import Attachment
from bulkmail.providers import mailtrap
from bulkmail.providers.base import (
    BatchProvider,
    FatalError,
    PermanentError,
    TransientError,
)
from bulkmail.providers.mailtrap import MailtrapProvider, config_problem
from tests.mailtrap_schema import batch_problems, documented, send_problems
from tests.test_providers_mailtrap import TOKEN, answer, make_message

IDS = (("bulkmail_job", "7"), ("bulkmail_delivery", "41"))


def messages(n: int) -> list[Any]:
    return [
        make_message(
            to_email=f"p{i}@example.com",
            to_name=f"Person {i}",
            subject=f"Reminder {i}",
            text=f"Hello {i}\n",
            message_id=f"<bulkmail.7.{i}.tok@example.org>",
            variables=(("bulkmail_job", "7"), ("bulkmail_delivery", str(40 + i))),
        )
        for i in range(n)
    ]


def provider_for(httpserver: HTTPServer, **changes: Any) -> MailtrapProvider:
    settings = MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/"), timeout=5.0)
    return MailtrapProvider(replace(settings, **changes))


def ok(n: int) -> dict[str, Any]:
    return {
        "success": True,
        "responses": [{"success": True, "message_ids": [f"id-{i}"]} for i in range(n)],
    }


# --- the request -------------------------------------------------------------------------


def test_is_a_batch_provider_with_the_request_limit_of_its_token(httpserver: HTTPServer) -> None:
    provider = provider_for(httpserver)
    assert isinstance(provider, BatchProvider)
    assert provider.batch_size == 100  # the default
    limit = provider.request_limit
    assert TOKEN not in limit.key and limit.key.startswith("mailtrap-requests:")
    assert limit.key == provider_for(httpserver, api_url="https://x.example").request_limit.key
    # never more than Mailtrap's 150 requests in any 10 s
    assert limit.rate * 10 + limit.burst <= 150


def test_batch_request_matches_the_spec_one_recipient_per_entry(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, ok(3), path="/api/batch")
    provider = provider_for(httpserver, category="reminders")
    batch = messages(3)
    batch[1] = replace(
        batch[1],
        html="<p>Hi</p>",
        attachments=(Attachment("plan.pdf", "application/pdf", b"%PDF\x00\xff"),),
        headers=(("Auto-Submitted", "auto-generated"),),
    )
    assert provider.send_batch(batch) == ["id-0", "id-1", "id-2"]
    got = seen.only
    assert got["path"] == "/api/batch"
    assert got["headers"]["Authorization"] == f"Bearer {TOKEN}"
    doc = json.loads(got["body"])
    assert batch_problems(doc) == []
    assert doc["base"] == {
        "from": {"email": "office@example.org", "name": "Kursbüro"},
        "category": "reminders",
    }
    assert [r["to"] for r in doc["requests"]] == [
        [{"email": f"p{i}@example.com", "name": f"Person {i}"}] for i in range(3)
    ]
    second = doc["requests"][1]
    assert second["subject"] == "Reminder 1"
    assert second["html"] == "<p>Hi</p>"
    assert second["headers"] == {
        "Message-ID": "<bulkmail.7.1.tok@example.org>",
        "Auto-Submitted": "auto-generated",
    }
    assert base64.b64decode(second["attachments"][0]["content"]) == b"%PDF\x00\xff"
    assert [r["custom_variables"] for r in doc["requests"]] == [
        {"bulkmail_job": "7", "bulkmail_delivery": str(40 + i)} for i in range(3)
    ]


def test_sandbox_batch_path(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, ok(2), path="/api/batch/2049")
    provider = provider_for(httpserver, inbox_id="2049")
    assert provider.batch_url.endswith("/api/batch/2049")
    assert provider.send_batch(messages(2)) == ["id-0", "id-1"]
    assert seen.only["path"] == "/api/batch/2049"


def test_single_send_carries_custom_variables(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["one"]})
    assert provider_for(httpserver).send(make_message(variables=IDS)) == "one"
    body = json.loads(seen.only["body"])
    assert send_problems(body) == []
    assert body["custom_variables"] == {"bulkmail_job": "7", "bulkmail_delivery": "41"}


# --- answers -----------------------------------------------------------------------------


def test_failed_entries_inside_a_200_fail_alone(httpserver: HTTPServer) -> None:
    body = {
        "success": False,
        "responses": [
            {"success": True, "message_ids": ["id-0"]},
            {"success": False, "errors": ["'to' address is invalid", "bounced before"]},
            {"success": True, "message_ids": ["id-2"]},
            {"weird": 1},
        ],
    }
    seen = answer(httpserver, 200, body, path="/api/batch")
    results = provider_for(httpserver).send_batch(messages(4))
    assert len(seen.requests) == 1  # never resent as a whole
    assert results[0] == "id-0" and results[2] == "id-2"
    assert isinstance(results[1], PermanentError)
    assert (
        str(results[1]) == "Mailtrap rejected the message: 'to' address is invalid; bounced before"
    )
    assert isinstance(results[3], TransientError) and results[3].outcome_unknown


def test_an_answer_without_one_result_per_message_leaves_all_in_doubt(
    httpserver: HTTPServer,
) -> None:
    answer(httpserver, 200, ok(2), path="/api/batch")
    with pytest.raises(TransientError, match="batch of 3 messages with 2 results") as info:
        provider_for(httpserver).send_batch(messages(3))
    assert info.value.outcome_unknown


@pytest.mark.parametrize(
    ("status", "error", "check"),
    [
        (400, PermanentError, lambda e: "'from' is required" in str(e)),
        (401, FatalError, lambda e: "(401): Unauthorized" in str(e)),
        (403, FatalError, lambda e: "(403): Forbidden" in str(e)),
        (500, TransientError, lambda e: e.outcome_unknown and not e.throttled),
    ],
)
def test_documented_error_answers(
    httpserver: HTTPServer, status: int, error: type[Exception], check: Any
) -> None:
    answer(httpserver, status, documented(status), path="/api/batch")
    with pytest.raises(error) as info:
        provider_for(httpserver).send_batch(messages(2))
    assert check(info.value), str(info.value)


def test_429_is_throttled_with_retry_after(httpserver: HTTPServer) -> None:
    answer(
        httpserver,
        429,
        {"success": False, "errors": ["Too many requests"]},
        path="/api/batch",
        headers={"Retry-After": "3"},
    )
    with pytest.raises(TransientError) as info:
        provider_for(httpserver).send_batch(messages(2))
    assert info.value.throttled and info.value.untried
    assert info.value.retry_after == 3 and not info.value.outcome_unknown


def test_read_timeout_leaves_the_batch_in_doubt(httpserver: HTTPServer) -> None:
    answer(httpserver, 200, ok(2), path="/api/batch", before=lambda: time.sleep(1.5))
    provider = provider_for(httpserver, timeout=0.3)
    with pytest.raises(TransientError, match="batch of 2 messages") as info:
        provider.send_batch(messages(2))
    assert info.value.outcome_unknown


# --- sizes -------------------------------------------------------------------------------


def test_a_message_over_10_mb_encoded_is_refused_without_a_request(
    httpserver: HTTPServer,
) -> None:
    # 7.6 MB of attachment is 10.1 MB base64-encoded: under 10 MB raw, over it as sent
    big = Attachment("big.bin", "application/octet-stream", b"\x00" * 7_600_000)
    seen = answer(httpserver, 200, ok(1), path="/api/batch")
    batch = messages(2)
    batch[0] = replace(batch[0], attachments=(big,))
    results = provider_for(httpserver).send_batch(batch)
    assert isinstance(results[0], PermanentError)
    assert "10 MB limit" in str(results[0]) and "base64" in str(results[0])
    assert results[1] == "id-0"
    assert len(json.loads(seen.only["body"])["requests"]) == 1
    with pytest.raises(PermanentError, match="10 MB limit"):
        provider_for(httpserver).send(batch[0])
    assert len(seen.requests) == 1  # the single send made no request


def test_a_batch_stops_short_of_the_request_size_limit(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = len(json.dumps(provider_for(httpserver)._fields(messages(1)[0])))
    monkeypatch.setattr(mailtrap, "MAX_BATCH_BYTES", 200 + 2 * one + 50)
    seen = answer(httpserver, 200, ok(2), path="/api/batch")
    results = provider_for(httpserver).send_batch(messages(5))
    assert results == ["id-0", "id-1"]  # the other three were not carried: untried
    assert len(json.loads(seen.only["body"])["requests"]) == 2


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("inbox", ["abc", "0", "-3", "1.5", "12 34", "٣"])
def test_inbox_id_must_be_a_positive_integer(inbox: str) -> None:
    settings = MailtrapSettings(token=TOKEN, api_url="https://sandbox.api.mailtrap.io")
    problem = config_problem(replace(settings, inbox_id=inbox))
    assert problem is not None and "inbox_id must be a positive integer" in problem
    assert config_problem(replace(settings, inbox_id=" 2049 ")) is None


@pytest.mark.parametrize("size", [0, -1, 501, 10_000])
def test_batch_size_is_1_to_500(size: int) -> None:
    settings = replace(MailtrapSettings(token=TOKEN), batch_size=size)
    problem = config_problem(settings)
    assert problem is not None and "batch_size" in problem and "500" in problem
    with pytest.raises(FatalError, match="batch_size"):
        MailtrapProvider(settings).send_batch(messages(1))


def test_bad_settings_are_a_config_error_before_any_job() -> None:
    from bulkmail.config import Settings
    from bulkmail.providers.registry import check_provider

    settings = Settings(mailtrap=MailtrapSettings(token=TOKEN, batch_size=501))
    with pytest.raises(ConfigError, match="batch_size"):
        check_provider("mailtrap", settings)
    for size in (1, 500):
        check_provider(
            "mailtrap", Settings(mailtrap=MailtrapSettings(token=TOKEN, batch_size=size))
        )
