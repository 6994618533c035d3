"""MailtrapProvider against a real local HTTP server (pytest-httpserver): the request must
look like the published sending API expects, and every kind of answer must be classified
into the right error class. Nothing in requests is mocked."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from bulkmail import __version__
from bulkmail.config import MailtrapSettings
from bulkmail.models import Attachment, Message
from bulkmail.providers.base import (
    FatalError,
    PermanentError,
    Provider,
    ProviderError,
    TransientError,
)
from bulkmail.providers.mailtrap import TOKEN_MISSING, MailtrapProvider

TOKEN = "mt-test-token-0123456789abcdef"
MESSAGE_ID = "<20260101.abc123@bulkmail.example.org>"
PDF_BYTES = b"%PDF-1.4\n\x00\xff\xfe binary \r\n\x80 payload"


def make_message(**overrides: Any) -> Message:
    values: dict[str, Any] = {
        "from_email": "office@example.org",
        "from_name": "Kursbüro",
        "to_email": "ada@example.com",
        "to_name": "Ada Lovelace",
        "subject": "Erinnerung \N{EN DASH} Ihr Kurs am Montag",
        "text": "Hallo Ada,\nbitte denken Sie an Montag.\n",
        "message_id": MESSAGE_ID,
    }
    values.update(overrides)
    return Message(**values)


@pytest.fixture
def settings(httpserver: HTTPServer) -> MailtrapSettings:
    return MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/"), timeout=5.0)


@pytest.fixture
def provider(settings: MailtrapSettings) -> Iterator[MailtrapProvider]:
    p = MailtrapProvider(settings)
    yield p
    p.close()


class Seen:
    """What the server received, captured inside the handler (the request body is not
    readable after the response has gone)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def record(self, request: Request) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": request.get_data(),
            }
        )

    @property
    def only(self) -> dict[str, Any]:
        assert len(self.requests) == 1, self.requests
        return self.requests[0]


def answer(
    httpserver: HTTPServer,
    status: int = 200,
    body: Any = None,
    *,
    path: str = "/api/send",
    headers: dict[str, str] | None = None,
    raw: str | None = None,
    before: Callable[[], object] | None = None,
) -> Seen:
    """Serve POST ``path`` with a fixed answer (JSON ``body`` or ``raw`` text) and record
    what arrived."""
    seen = Seen()
    text = raw if raw is not None else json.dumps(body if body is not None else {})
    mimetype = "text/plain" if raw is not None else "application/json"

    def handler(request: Request) -> Response:
        seen.record(request)
        if before is not None:
            before()
        return Response(text, status=status, headers=headers or {}, mimetype=mimetype)

    httpserver.expect_request(path, method="POST").respond_with_handler(handler)
    return seen


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the request -------------------------------------------------------------------------


def test_request_matches_the_sending_api(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["0c7fd939-02cf-11ed"]})
    provider_with_category = MailtrapProvider(
        MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/"), category="reminders")
    )
    message = make_message(
        html="<p>Hallo <b>Ada</b></p>",
        attachments=(
            Attachment("plan.pdf", "application/pdf", PDF_BYTES),
            Attachment("notes.txt", "text/plain", "Grüße\n".encode()),
        ),
        headers=(("X-Bulkmail-Job", "job-42"), ("List-Unsubscribe", "<mailto:u@example.org>")),
    )

    assert provider_with_category.send(message) == "0c7fd939-02cf-11ed"
    provider_with_category.close()

    got = seen.only
    assert got["method"] == "POST"
    assert got["path"] == "/api/send"
    assert got["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert got["headers"]["User-Agent"] == f"bulkmail/{__version__}"
    assert got["headers"]["Content-Type"] == "application/json"
    assert got["headers"]["Accept"] == "application/json"
    body = json.loads(got["body"])
    assert body == {
        "from": {"email": "office@example.org", "name": "Kursbüro"},
        "to": [{"email": "ada@example.com", "name": "Ada Lovelace"}],
        "subject": "Erinnerung \N{EN DASH} Ihr Kurs am Montag",
        "text": "Hallo Ada,\nbitte denken Sie an Montag.\n",
        "html": "<p>Hallo <b>Ada</b></p>",
        "category": "reminders",
        "headers": {
            "Message-ID": MESSAGE_ID,
            "X-Bulkmail-Job": "job-42",
            "List-Unsubscribe": "<mailto:u@example.org>",
        },
        "attachments": [
            {
                "content": base64.b64encode(PDF_BYTES).decode(),
                "filename": "plan.pdf",
                "type": "application/pdf",
                "disposition": "attachment",
            },
            {
                "content": base64.b64encode("Grüße\n".encode()).decode(),
                "filename": "notes.txt",
                "type": "text/plain",
                "disposition": "attachment",
            },
        ],
    }
    assert base64.b64decode(body["attachments"][0]["content"]) == PDF_BYTES
    assert base64.b64decode(body["attachments"][1]["content"]).decode() == "Grüße\n"
    httpserver.check_assertions()


def test_minimal_message_leaves_optional_fields_out(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["id-1"]})
    provider.send(make_message(from_name="", to_name=""))
    body = json.loads(seen.only["body"])
    assert body["from"] == {"email": "office@example.org"}
    assert body["to"] == [{"email": "ada@example.com"}]
    assert body["headers"] == {"Message-ID": MESSAGE_ID}
    for absent in ("html", "category", "attachments"):
        assert absent not in body


def test_message_id_cannot_be_overridden_by_extra_headers(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["id-1"]})
    provider.send(make_message(headers=(("message-id", "<other@x>"), ("X-A", "1"))))
    assert json.loads(seen.only["body"])["headers"] == {"Message-ID": MESSAGE_ID, "X-A": "1"}


def test_sandbox_inbox_path(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["s-1"]}, path="/api/send/2049")
    settings = MailtrapSettings(token=TOKEN, api_url=httpserver.url_for(""), inbox_id="2049")
    provider = MailtrapProvider(settings)
    assert provider.url.endswith("/api/send/2049")
    assert provider.send(make_message()) == "s-1"
    assert seen.only["path"] == "/api/send/2049"
    assert seen.only["headers"]["Authorization"] == f"Bearer {TOKEN}"
    httpserver.check_assertions()


def test_api_url_with_a_path_prefix(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, {"success": True}, path="/proxy/mailtrap/api/send")
    settings = MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/proxy/mailtrap/"))
    assert MailtrapProvider(settings).send(make_message()) is None  # no message_ids
    assert seen.only["path"] == "/proxy/mailtrap/api/send"


# --- answers -----------------------------------------------------------------------------


def test_400_is_permanent_with_the_api_errors(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    answer(
        httpserver,
        400,
        {"success": False, "errors": ["'to' address is invalid", "subject is missing"]},
    )
    with pytest.raises(PermanentError) as info:
        provider.send(make_message())
    assert "'to' address is invalid; subject is missing" in str(info.value)
    assert "400" in str(info.value)


def test_4xx_with_a_non_json_body_is_one_short_line(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    answer(httpserver, 422, raw="<html>\n<body>\nUnprocessable\n" + "x" * 2000 + "</body>")
    with pytest.raises(PermanentError) as info:
        provider.send(make_message())
    text = str(info.value)
    assert "\n" not in text
    assert "Unprocessable" in text
    assert len(text) < 400


def test_401_is_fatal(httpserver: HTTPServer, provider: MailtrapProvider) -> None:
    answer(httpserver, 401, {"success": False, "errors": ["Unauthorized"]})
    with pytest.raises(FatalError, match=r"Mailtrap rejected the API token \(401\): Unauthorized"):
        provider.send(make_message())


def test_403_is_fatal_with_the_servers_text(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    # issue 13: a 403 (unverified domain, a token that may not send) stops the job like a
    # 401 instead of failing every recipient one by one
    answer(httpserver, 403, {"success": False, "errors": ["domain is not verified"]})
    with pytest.raises(FatalError, match=r"\(403\): domain is not verified"):
        provider.send(make_message())


def test_429_is_transient_with_retry_after(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    answer(
        httpserver,
        429,
        {"success": False, "errors": ["Too many requests"]},
        headers={"Retry-After": "7"},
    )
    with pytest.raises(TransientError) as info:
        provider.send(make_message())
    assert info.value.retry_after == 7
    assert info.value.outcome_unknown is False
    assert "Too many requests" in str(info.value)


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        (None, None, None),
        ("0", 0, 0),
        ("2.5", 2.5, 2.5),
        ("soon", None, None),
        ("-3", None, None),
        ("DATE+30", 25, 31),
        ("DATE-30", 0, 0),
    ],
)
def test_retry_after_forms(
    httpserver: HTTPServer,
    provider: MailtrapProvider,
    header: str | None,
    low: float | None,
    high: float | None,
) -> None:
    headers = {}
    if header is not None:
        if header.startswith("DATE"):
            header = formatdate(time.time() + int(header[4:]), usegmt=True)
        headers["Retry-After"] = header
    answer(httpserver, 429, {"success": False, "errors": ["slow down"]}, headers=headers)
    with pytest.raises(TransientError) as info:
        provider.send(make_message())
    if low is None:
        assert info.value.retry_after is None
    else:
        assert info.value.retry_after is not None
        assert low <= info.value.retry_after <= (high if high is not None else low)


@pytest.mark.parametrize(
    ("status", "unknown"),
    [(500, False), (503, False), (502, True), (504, True), (599, False), (408, False)],
)
def test_5xx_is_transient(
    httpserver: HTTPServer, provider: MailtrapProvider, status: int, unknown: bool
) -> None:
    answer(
        httpserver,
        status,
        {"success": False, "errors": ["Internal error, retry later"]},
        headers={"Retry-After": "12"},
    )
    with pytest.raises(TransientError) as info:
        provider.send(make_message())
    assert info.value.retry_after == 12
    assert info.value.outcome_unknown is unknown
    assert f"({status})" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    ["<html>OK</html>", json.dumps({"success": False, "errors": ["odd"]}), "[]", "{}"],
)
def test_2xx_without_confirmation_is_outcome_unknown(
    httpserver: HTTPServer, provider: MailtrapProvider, raw: str
) -> None:
    answer(httpserver, 200, raw=raw)
    with pytest.raises(TransientError) as info:
        provider.send(make_message())
    assert info.value.outcome_unknown is True


def test_redirect_is_not_followed_and_is_fatal(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    answer(httpserver, 301, raw="", headers={"Location": "https://elsewhere.example/api/send"})
    with pytest.raises(FatalError, match=r"redirect \(301\) to https://elsewhere\.example"):
        provider.send(make_message())
    assert len(httpserver.log) == 1


# --- the network -------------------------------------------------------------------------


def test_connection_refused_is_transient_and_was_not_sent() -> None:
    port = unused_port()
    provider = MailtrapProvider(MailtrapSettings(token=TOKEN, api_url=f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        provider.send(make_message())
    assert time.monotonic() - started < 2
    assert info.value.outcome_unknown is False
    assert "\n" not in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_read_timeout_is_transient_with_unknown_outcome(httpserver: HTTPServer) -> None:
    release = threading.Event()
    answer(
        httpserver, 200, {"success": True, "message_ids": ["late"]}, before=lambda: release.wait(2)
    )
    provider = MailtrapProvider(
        MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/"), timeout=0.1)
    )
    started = time.monotonic()
    try:
        with pytest.raises(TransientError) as info:
            provider.send(make_message())
    finally:
        release.set()  # let the single-threaded test server go on to the next test
    assert time.monotonic() - started < 1.5
    assert info.value.outcome_unknown is True
    assert "0.1 s" in str(info.value)


def test_connection_dropped_after_sending_is_outcome_unknown() -> None:
    """A server that reads the request and hangs up without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            data = b""
            while b"Message-ID" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    provider = MailtrapProvider(MailtrapSettings(token=TOKEN, api_url=f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(TransientError) as info:
            provider.send(make_message())
    finally:
        thread.join(2)
        listener.close()
    assert info.value.outcome_unknown is True
    assert received and received[0].startswith(b"POST /api/send HTTP/1.1")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_untrusted_tls_certificate_is_fatal(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = HTTPServer(host="localhost", port=0, ssl_context=context)
    server.expect_request("/api/send").respond_with_json({"success": True})
    server.start()
    try:
        provider = MailtrapProvider(MailtrapSettings(token=TOKEN, api_url=server.url_for("/")))
        with pytest.raises(FatalError, match="certificate"):
            provider.send(make_message())
    finally:
        server.clear()
        server.stop()
    assert server.log == []


# --- configuration -----------------------------------------------------------------------


def test_missing_token_is_fatal_without_a_request(httpserver: HTTPServer) -> None:
    provider = MailtrapProvider(MailtrapSettings(token="  ", api_url=httpserver.url_for("/")))
    with pytest.raises(FatalError) as info:
        provider.send(make_message())
    assert str(info.value) == TOKEN_MISSING
    assert "BULKMAIL_MAILTRAP_TOKEN" in str(info.value)
    assert httpserver.log == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"token": "abc\r\nX-Evil: 1"}, "token contains"),
        ({"api_url": "send.api.mailtrap.io"}, "must be an http"),
        ({"api_url": "ftp://send.api.mailtrap.io"}, "must be an http"),
        ({"api_url": "https://send.api.mailtrap.io/api/send"}, "without /api/send"),
        ({"category": "c" * 256}, "at most 255"),
        ({"api_url": "https://send.api.mailtrap.io", "inbox_id": "12"}, "sandbox"),
    ],
)
def test_unusable_settings_are_fatal(changes: dict[str, Any], expected: str) -> None:
    settings = replace(MailtrapSettings(token=TOKEN), **changes)
    with pytest.raises(FatalError, match=expected) as info:
        MailtrapProvider(settings).send(make_message())
    assert "\n" not in str(info.value)
    assert TOKEN not in str(info.value)


def test_category_of_255_characters_is_sent(httpserver: HTTPServer) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["c"]})
    settings = MailtrapSettings(token=TOKEN, api_url=httpserver.url_for("/"), category="c" * 255)
    MailtrapProvider(settings).send(make_message())
    assert json.loads(seen.only["body"])["category"] == "c" * 255


# --- the session -------------------------------------------------------------------------


def test_one_session_is_reused_and_close_is_idempotent(
    httpserver: HTTPServer, settings: MailtrapSettings
) -> None:
    seen = answer(httpserver, 200, {"success": True, "message_ids": ["m"]})
    session = requests.Session()
    used: list[requests.Session] = []
    closed: list[bool] = []
    original_close = session.close

    def on_response(response: requests.Response, *args: object, **kwargs: object) -> None:
        used.append(session)

    def tracking_close() -> None:
        closed.append(True)
        original_close()

    session.hooks["response"].append(on_response)
    session.close = tracking_close  # type: ignore[method-assign]
    provider = MailtrapProvider(settings, session=session)

    for _ in range(3):
        assert provider.send(make_message()) == "m"
    assert len(used) == 3
    assert len(seen.requests) == 3
    provider.close()
    provider.close()
    assert closed
    # after close() the provider still works: requests opens a fresh connection
    assert provider.send(make_message()) == "m"
    assert len(seen.requests) == 4


def test_default_session_is_created_once(
    httpserver: HTTPServer, provider: MailtrapProvider
) -> None:
    answer(httpserver, 200, {"success": True, "message_ids": ["m"]})
    first = provider._session
    provider.send(make_message())
    provider.send(make_message())
    assert provider._session is first
    assert isinstance(first, requests.Session)


def test_is_a_provider(settings: MailtrapSettings) -> None:
    provider: Provider = MailtrapProvider(settings)
    assert provider.name == "mailtrap"
    assert issubclass(FatalError, ProviderError)
