"""The Mailtrap sending API transport, over requests: ``POST /api/send`` for one message,
``POST /api/batch`` for up to ``batch_size`` (at most 500) messages in one request.

Live sending goes to ``{api_url}/api/send`` (``/api/batch``); when ``inbox_id`` is set the
messages go to the sandbox (testing inbox) at ``{api_url}/api/send/{inbox_id}``
(``/api/batch/{inbox_id}``). One ``requests.Session`` is kept for the provider's life, so
the TLS connection is reused between requests. Every message carries ``custom_variables``
with its job and delivery ids (``Message.variables``), which Mailtrap echoes in its webhook
events.

A batch has one entry of ``requests[]`` per message, each with its own recipient, subject,
text, headers and custom_variables, so ``responses[i]`` is the outcome of message i;
``base`` holds what every message shares (the sender, the category). Headers stay with
each entry: an entry's ``headers`` overrides ``base``'s (the spec documents overriding,
not merging) and each entry has its own Message-ID. A message whose JSON (attachments
base64-encoded) is over 10 MB is refused before any request; a batch stops short of 50 MB
(the messages left over are handed back untried). The API allows 150 requests per 10 s
per token: ``request_limit`` is that bucket, taken by the manager before every request.

How answers are classified (the manager only sees the error class):

- 2xx with ``{"success": true}`` -> sent; the first of ``message_ids`` is returned.
- 2xx whose body is not JSON, or not ``success: true`` -> TransientError with
  ``outcome_unknown``: the status says "accepted" but the body does not confirm it (a proxy
  or a catch-all web server on a wrong ``api_url`` answers like this). Retrying may deliver
  twice with the same Message-ID; treating it as sent could silently lose a whole job.
- 401 -> FatalError (the token is wrong: nothing can be sent); 403 -> FatalError too (the
  sending domain is not verified, or the token may not send: no message would go).
- 429 -> TransientError ``throttled`` (nothing was looked at: the attempt is given back),
  408 and 5xx -> TransientError; each with ``retry_after`` from ``Retry-After`` (seconds or
  an HTTP date); 502 and 504 come from a gateway that may have passed the message on, so
  they also set ``outcome_unknown``.
- A batch's 2xx is read entry by entry: ``success: true`` -> sent with its message id,
  ``success: false`` -> PermanentError with the entry's ``errors``; an answer without one
  result per message -> TransientError with ``outcome_unknown`` for the whole batch.
- 3xx -> FatalError (``api_url`` points somewhere that redirects: redirects are not
  followed, since that would re-send the token and body to another address).
- other 4xx -> PermanentError with the API's ``errors`` joined by "; ".
- connection refused, DNS failure, connect timeout, TLS handshake failure -> TransientError
  (the request was never sent); a read timeout or a connection dropped after the request
  was written -> TransientError with ``outcome_unknown``; a TLS certificate that cannot be
  verified -> FatalError.

Configuration problems (no token, a token with control characters, a malformed
``api_url``, a category over 255 characters, an ``inbox_id`` that is not a positive
integer or is set with the live sending host, a ``batch_size`` outside 1..500) are
reported as FatalError by the first ``send``, so the manager aborts the job the usual way;
constructing the provider never raises.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import math
import ssl
import time
from collections.abc import Iterator, Sequence
from datetime import UTC
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import requests
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
)
from urllib3.exceptions import ProxyError as Urllib3ProxyError
from urllib3.exceptions import SSLError as Urllib3SSLError

from bulkmail import __version__
from bulkmail.models import Message
from bulkmail.providers.base import (
    BatchEntry,
    FatalError,
    PermanentError,
    RequestLimit,
    TransientError,
)
from bulkmail.providers.settings import MailtrapSettings
from bulkmail.providers.tls import ca_file_problem, client_context, plaintext_problem

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the TCP/TLS connection; the read timeout is ``settings.timeout``."""

MAX_CATEGORY_LENGTH = 255
MAX_BATCH_SIZE = 500  # messages per /api/batch request
MAX_MESSAGE_BYTES = 10_000_000  # one message's JSON, attachments base64-encoded (10 MB)
MAX_BATCH_BYTES = 50_000_000  # one /api/batch request body (50 MB)
# 150 requests per 10 s per token: 14 per second with a burst of 5 allows at most 145 in
# any 10 s, leaving room for the jitter between our clock and Mailtrap's counting
REQUEST_RATE = 14.0
REQUEST_BURST = 5
LIVE_HOSTS = frozenset({"send.api.mailtrap.io", "bulk.api.mailtrap.io"})
SANDBOX_URL = "https://sandbox.api.mailtrap.io"

_BODY_LIMIT = 300  # characters of a non-JSON error body kept in the error text
_ERRORS_LIMIT = 1000  # characters of the API's joined ``errors`` kept in the error text

TOKEN_MISSING = (
    "the mailtrap provider needs a token: set BULKMAIL_MAILTRAP_TOKEN or `token` under [mailtrap]"
)
CA_FILE_SETTING = "ca_file under [mailtrap] (BULKMAIL_MAILTRAP_CA_FILE)"


class _CaAdapter(requests.adapters.HTTPAdapter):
    """Verifies HTTPS servers with one given ``SSLContext`` (the system's trust store plus
    ``ca_file``) instead of requests' own CA bundle. ``verify=ca_file`` would not do: it
    replaces the trust store, so the public API's certificate would no longer verify."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # always verified, with the context's trust store: requests would otherwise load
        # its own CA bundle into the context at every new connection (no client
        # certificate is ever used, so nothing else of the base method applies)
        conn.cert_reqs = "CERT_REQUIRED" if url.lower().startswith("https") else "CERT_NONE"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class MailtrapProvider:
    """Sends each message with the Mailtrap sending API. Not thread-safe: one instance is
    used by one thread at a time (see ``Provider``)."""

    name = "mailtrap"

    def __init__(
        self, settings: MailtrapSettings, *, session: requests.Session | None = None
    ) -> None:
        self.settings = settings
        self._session = session if session is not None else requests.Session()
        self._token = settings.token.strip()
        self._problem = _config_problem(settings, self._token)
        if not self._problem and settings.ca_file:
            try:
                context = client_context(settings.ca_file)
            except (OSError, ValueError):  # gone since it was checked: say so at the send
                self._problem = ca_file_problem(settings.ca_file, CA_FILE_SETTING)
            else:
                self._session.mount("https://", _CaAdapter(context))
        self._url = "" if self._problem else _endpoint(settings, "send")
        self._batch_url = "" if self._problem else _endpoint(settings, "batch")
        self._timeout = (CONNECT_TIMEOUT, float(settings.timeout))
        self._headers = {
            "Authorization": f"Bearer {self._token}",
            "User-Agent": f"bulkmail/{__version__}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    @property
    def url(self) -> str:
        """The endpoint messages are posted to ("" when the configuration is unusable)."""
        return self._url

    @property
    def batch_url(self) -> str:
        """The endpoint batches are posted to ("" when the configuration is unusable)."""
        return self._batch_url

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def request_limit(self) -> RequestLimit:
        digest = hashlib.sha256(self._token.encode()).hexdigest()[:12]
        return RequestLimit(f"mailtrap-requests:{digest}", REQUEST_RATE, REQUEST_BURST)

    def send(self, message: Message) -> str | None:
        if self._problem:
            raise FatalError(self._problem)
        payload = json.dumps(self.request_body(message)).encode("ascii")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise _too_large(len(payload))
        with self._post(self._url, payload, "the message") as response:
            return _classify(response)

    def send_batch(self, messages: Sequence[Message]) -> list[BatchEntry]:
        """Post ``messages`` to ``/api/batch`` in one request (see ``BatchProvider``): a
        message over 10 MB is refused without being sent; the request stops short of 50 MB,
        and the entries returned then cover only the messages it carried."""
        if self._problem:
            raise FatalError(self._problem)
        base: dict[str, Any] = {}
        senders = {(m.from_email, m.from_name) for m in messages}
        shared_from = len(senders) == 1
        if shared_from:
            base["from"] = _address(*next(iter(senders)))
        if self.settings.category:
            base["category"] = self.settings.category
        head = '{"base":' + json.dumps(base) + ',"requests":['
        size = len(head) + 2  # and the closing "]}"
        results: list[BatchEntry | None] = []
        carried: list[str] = []
        for message in messages:
            entry = self._fields(message)
            if not shared_from:
                entry["from"] = _address(message.from_email, message.from_name)
            encoded = json.dumps(entry)
            alone = len(encoded) + len(head) + 2  # what it would weigh sent on its own
            if alone > MAX_MESSAGE_BYTES:
                results.append(_too_large(alone))
                continue
            if size + len(encoded) + 1 > MAX_BATCH_BYTES:
                break  # the rest go in a later request
            size += len(encoded) + (1 if carried else 0)
            carried.append(encoded)
            results.append(None)  # filled from the answer
        if carried:
            payload = (head + ",".join(carried) + "]}").encode("ascii")
            what = f"the batch of {len(carried)} messages"
            with self._post(self._batch_url, payload, what) as response:
                answers = iter(_classify_batch(response, len(carried)))
            results = [next(answers) if r is None else r for r in results]
        return results

    def _post(self, url: str, payload: bytes, what: str) -> requests.Response:
        """POST ``payload``; a failure to get an answer is raised as its error class."""
        host = urlsplit(url).netloc
        try:
            return self._session.post(
                url,
                data=payload,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.exceptions.ReadTimeout as exc:
            raise TransientError(
                f"no answer from Mailtrap ({host}) within {self._timeout[1]:g} s after "
                f"{what} went out: it may or may not have been accepted",
                outcome_unknown=True,
            ) from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise TransientError(
                f"could not connect to Mailtrap ({host}) within {CONNECT_TIMEOUT:g} s",
                unreachable=True,
            ) from exc
        except requests.exceptions.SSLError as exc:
            if any(isinstance(c, ssl.SSLCertVerificationError) for c in _causes(exc)):
                hint = "" if self.settings.ca_file else f"; a private CA: set {CA_FILE_SETTING}"
                raise FatalError(
                    f"the TLS certificate of {host} could not be verified: {_describe(exc)}{hint}"
                ) from exc
            raise TransientError(
                f"TLS error talking to Mailtrap ({host}): {_describe(exc)}",
                outcome_unknown=not _failed_before_sending(exc),
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            if _failed_before_sending(exc):
                raise TransientError(
                    f"could not connect to Mailtrap ({host}): {_describe(exc)}",
                    unreachable=True,
                ) from exc
            raise TransientError(
                f"connection to Mailtrap ({host}) lost after {what} went out, it may or "
                f"may not have been accepted: {_describe(exc)}",
                outcome_unknown=True,
            ) from exc
        except (
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            raise TransientError(
                f"Mailtrap's answer was cut off or garbled, it is unknown whether {what} "
                f"was accepted: {_describe(exc)}",
                outcome_unknown=True,
            ) from exc
        except requests.exceptions.RetryError as exc:  # only with a custom retrying adapter
            raise TransientError(f"Mailtrap kept failing: {_describe(exc)}") from exc
        except (
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidHeader,
        ) as exc:
            raise FatalError(f"the mailtrap settings are unusable: {_describe(exc)}") from exc

    def request_body(self, message: Message) -> dict[str, Any]:
        """The JSON document posted to ``/api/send`` for ``message``."""
        body: dict[str, Any] = {"from": _address(message.from_email, message.from_name)}
        body.update(self._fields(message))
        if self.settings.category:
            body["category"] = self.settings.category
        return body

    def _fields(self, message: Message) -> dict[str, Any]:
        """What is this message's own (all but the sender and the category): a batch entry."""
        body: dict[str, Any] = {
            "to": [_address(message.to_email, message.to_name)],
            "subject": message.subject,
            "text": message.text,
        }
        if message.html:
            body["html"] = message.html
        if message.cc:
            body["cc"] = [_address(address, name) for name, address in message.cc]
        if message.bcc:
            body["bcc"] = [_address(address, name) for name, address in message.bcc]
        if message.reply_to:
            name, address = message.reply_to[0]
            body["reply_to"] = _address(address, name)
        # Message-ID always wins: it is what makes a retry recognisable as the same message.
        # Extra headers are merged case-insensitively, the last value of a name wins.
        extra: dict[str, tuple[str, str]] = {}
        for key, value in message.headers:
            if key.lower() != "message-id":
                extra[key.lower()] = (key, value)
        body["headers"] = {"Message-ID": message.message_id, **dict(extra.values())}
        if message.attachments:
            body["attachments"] = [
                {
                    "content": base64.b64encode(att.data).decode("ascii"),
                    "filename": att.filename,
                    **({"type": att.content_type} if att.content_type else {}),
                    "disposition": "attachment",
                }
                for att in message.attachments
            ]
        if message.variables:
            body["custom_variables"] = dict(message.variables)
        return body

    def connect(self) -> None:
        """Nothing to open ahead: the session connects with the first request."""

    def close(self) -> None:
        """Close the session's connections. Safe to call more than once; a later ``send``
        simply opens a new connection."""
        self._session.close()


def _address(email_addr: str, name: str) -> dict[str, str]:
    return {"email": email_addr, "name": name} if name else {"email": email_addr}


def config_problem(settings: MailtrapSettings) -> str | None:
    """What makes these settings unusable before any request, or None (checked when a job
    is planned, so a missing token never creates a job, and again at the first send)."""
    return _config_problem(settings, settings.token.strip())


def _config_problem(settings: MailtrapSettings, token: str) -> str | None:
    if not token:
        return TOKEN_MISSING
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in token):
        return (
            "the mailtrap token contains spaces, control or non-ASCII characters: check "
            "BULKMAIL_MAILTRAP_TOKEN or `token` under [mailtrap]"
        )
    parts = urlsplit(settings.api_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (
            f"mailtrap api_url must be an http(s) URL such as https://send.api.mailtrap.io, "
            f"got {settings.api_url!r}"
        )
    if parts.scheme == "http":
        problem = plaintext_problem("the mailtrap token", parts.hostname, "use an https:// api_url")
        if problem is not None:
            return problem
    if "/api/send" in parts.path or "/api/batch" in parts.path:
        return (
            f"mailtrap api_url must be the API's base URL without /api/send (such as "
            f"{parts.scheme}://{parts.netloc}), got {settings.api_url!r}"
        )
    if len(settings.category) > MAX_CATEGORY_LENGTH:
        return (
            f"mailtrap category is {len(settings.category)} characters long, Mailtrap "
            f"accepts at most {MAX_CATEGORY_LENGTH}"
        )
    inbox = settings.inbox_id.strip()
    if inbox and not (inbox.isascii() and inbox.isdigit() and int(inbox) > 0):
        return (
            f"mailtrap inbox_id must be a positive integer (the sandbox inbox's id, from its "
            f"URL in Mailtrap), got {settings.inbox_id!r}"
        )
    size = settings.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
        return (
            f"mailtrap batch_size must be a whole number from 1 (one request per message) to "
            f"{MAX_BATCH_SIZE} (Mailtrap's most per batch request), got {size!r}"
        )
    if inbox and parts.hostname in LIVE_HOSTS:
        return (
            f"mailtrap inbox_id is set, which sends to a sandbox inbox, but api_url is the "
            f"live sending API ({parts.hostname}): set api_url to {SANDBOX_URL}, or clear "
            "inbox_id to send for real"
        )
    return ca_file_problem(settings.ca_file, CA_FILE_SETTING)


def _endpoint(settings: MailtrapSettings, kind: str) -> str:
    """``{api_url}/api/send`` or ``/api/batch``, with ``/{inbox_id}`` for the sandbox."""
    base = settings.api_url.strip().rstrip("/")
    inbox = settings.inbox_id.strip()
    return f"{base}/api/{kind}/{quote(inbox, safe='')}" if inbox else f"{base}/api/{kind}"


def _too_large(size: int) -> PermanentError:
    return PermanentError(
        f"the message is {size / 1_000_000:.1f} MB as Mailtrap receives it (attachments "
        f"base64-encoded), over its {MAX_MESSAGE_BYTES // 1_000_000} MB limit per message"
    )


def _classify_batch(response: requests.Response, count: int) -> list[BatchEntry]:
    """One entry per message of a batch from a 2xx answer, or raise the error class of a
    request that failed as a whole (as ``_classify``)."""
    status = response.status_code
    if not 200 <= status < 300:
        try:
            _raise_for_status(response)
        except TransientError as exc:
            if exc.throttled or exc.outcome_unknown:
                raise
            # a 5xx may come after Mailtrap handled part of the batch: every message in doubt
            raise TransientError(
                str(exc), retry_after=exc.retry_after, outcome_unknown=True
            ) from None
    try:
        data = response.json()
    except ValueError:
        raise TransientError(
            f"Mailtrap answered {status} to a batch with a body that is not JSON, so it is "
            f"unknown whether its messages were accepted: {_body_text(response)}",
            outcome_unknown=True,
        ) from None
    answers = data.get("responses") if isinstance(data, dict) else None
    if not isinstance(answers, list) or len(answers) != count:
        got = len(answers) if isinstance(answers, list) else "no"
        raise TransientError(
            f"Mailtrap answered {status} to a batch of {count} messages with {got} results, "
            f"so it is unknown which were accepted: {_error_detail(response)}",
            outcome_unknown=True,
        )
    return [_entry(item, status) for item in answers]


def _entry(item: Any, status: int) -> BatchEntry:
    """One message's result in a batch answer."""
    if isinstance(item, dict) and item.get("success") is True:
        ids = item.get("message_ids")
        if isinstance(ids, list) and ids and isinstance(ids[0], str | int):
            return str(ids[0])
        return None
    if isinstance(item, dict) and item.get("success") is False:
        detail = _one_line("; ".join(_flatten(item.get("errors"))), _ERRORS_LIMIT)
        return PermanentError(f"Mailtrap rejected the message: {detail or 'no reason given'}")
    return TransientError(
        f"Mailtrap answered {status} with a result for this message that is neither success "
        f"nor failure, so it is unknown whether it was accepted: "
        f"{_one_line(json.dumps(item), _BODY_LIMIT)}",
        outcome_unknown=True,
    )


def _classify(response: requests.Response) -> str | None:
    """Return the message id of an accepted message, or raise the error class."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            data = response.json()
        except ValueError:
            raise TransientError(
                f"Mailtrap answered {status} with a body that is not JSON, so it is unknown "
                f"whether the message was accepted: {_body_text(response)}",
                outcome_unknown=True,
            ) from None
        if not isinstance(data, dict) or data.get("success") is not True:
            raise TransientError(
                f"Mailtrap answered {status} without confirming success, so it is unknown "
                f"whether the message was accepted: {_error_detail(response)}",
                outcome_unknown=True,
            )
        ids = data.get("message_ids")
        if isinstance(ids, list) and ids and isinstance(ids[0], str | int):
            return str(ids[0])
        return None
    _raise_for_status(response)


def _raise_for_status(response: requests.Response) -> NoReturn:
    """Raise the error class of a request that was not accepted (not 2xx)."""
    status = response.status_code
    detail = _error_detail(response)
    if status == 401:
        raise FatalError(f"Mailtrap rejected the API token (401): {detail}")
    if status == 403:
        raise FatalError(
            f"Mailtrap refused to send (403): {detail}; check that the sending domain is "
            "verified and that the token may send from it"
        )
    if status == 429:
        raise TransientError(
            f"Mailtrap rate limit exceeded (429): {detail}",
            retry_after=_retry_after(response),
            throttled=True,
        )
    if status >= 500 or status == 408:
        raise TransientError(
            f"Mailtrap server error ({status}): {detail}",
            retry_after=_retry_after(response),
            outcome_unknown=status in (502, 504),
        )
    if 300 <= status < 400:
        location = _one_line(response.headers.get("Location", ""), _BODY_LIMIT) or "?"
        raise FatalError(
            f"Mailtrap answered with a redirect ({status}) to {location}: check the "
            "mailtrap api_url"
        )
    if 400 <= status < 500:
        raise PermanentError(f"Mailtrap rejected the message ({status}): {detail}")
    raise TransientError(  # 1xx cannot reach here; anything else is nonsense
        f"unexpected answer from Mailtrap ({status}): {detail}", outcome_unknown=True
    )


def _error_detail(response: requests.Response) -> str:
    """The API's ``errors`` joined by "; ", else the body text, one line and bounded."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("errors", "error", "message"):
            parts = list(_flatten(data.get(key)))
            if parts:
                return _one_line("; ".join(parts), _ERRORS_LIMIT)
    return _body_text(response)


def _body_text(response: requests.Response) -> str:
    text = _one_line(response.text, _BODY_LIMIT)
    return text or f"empty answer ({response.status_code} {response.reason or ''})".strip()


def _flatten(value: Any) -> Iterator[str]:
    if value is None or value == "" or value == [] or value == {}:
        return
    if isinstance(value, list | tuple):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = ", ".join(_flatten(item))
            yield f"{key}: {inner}" if inner else str(key)
    else:
        yield str(value)


def _retry_after(response: requests.Response) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds or an HTTP date; None when absent
    or unparsable."""
    raw = response.headers.get("Retry-After", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive: it means UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: requests puts urllib3's error in ``args[0]``, a
    MaxRetryError keeps the real one in ``reason``, and ``raise ... from`` sets
    ``__cause__``."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner: list[object] = [*current.args, getattr(current, "reason", None), current.__cause__]
        stack.extend(item for item in inner if isinstance(item, BaseException))


def _failed_before_sending(exc: BaseException) -> bool:
    """True when the error happened while opening the connection, so the request never
    left: connection refused, DNS failure, connect timeout, proxy or TLS handshake failure
    on a new connection. Anything else (a connection reset or closed while the request was
    written or the answer awaited) may have reached the server."""
    for cause in _causes(exc):
        if isinstance(cause, ConnectTimeoutError | Urllib3ProxyError | ClosedPoolError):
            return True
        if isinstance(cause, MaxRetryError) and isinstance(cause.reason, Urllib3SSLError):
            return True
    return False


def _describe(exc: BaseException) -> str:
    """The innermost useful text of a requests/urllib3 error, on one line."""
    best = str(exc)
    for cause in _causes(exc):
        if isinstance(cause, MaxRetryError):
            continue
        text = str(cause)
        if text and "Max retries exceeded" not in text:
            best = text
    return _one_line(best, _BODY_LIMIT) or type(exc).__name__


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------- pre-flight


def check(
    settings: MailtrapSettings, timeout: float, *, session: requests.Session | None = None
) -> str:
    """Prove the token without sending anything and return what was proved.

    The sending hosts offer only ``/api/send`` and ``/api/batch`` (mailtrap-openapi:
    email-sending-transactional, -bulk, sandbox-sending); no read-only endpoint takes a
    sending token. So the check posts an *empty* batch (``{"base": {}, "requests": []}``)
    to ``/api/batch`` (``/api/batch/{inbox_id}`` for the sandbox): it names no recipient, so
    nothing can be sent, and the API authenticates it before validating it. 401 or 403 is a
    rejected token (exit 3); a 2xx, 400 or 422 (the empty batch refused as invalid) proves
    the token was accepted; anything else (a redirect, 5xx, no connection) is exit 3 too.
    ``ConfigError`` (exit 2) for settings that could not work at all."""
    from bulkmail.errors import ConfigError, PreflightError

    token = settings.token.strip()
    problem = _config_problem(settings, token)
    if problem is not None:
        raise ConfigError(problem)
    base = settings.api_url.strip().rstrip("/")
    inbox = settings.inbox_id.strip()
    url = f"{base}/api/batch/{quote(inbox, safe='')}" if inbox else f"{base}/api/batch"
    host = urlsplit(url).netloc
    own = session is None
    http = requests.Session() if session is None else session
    try:
        if settings.ca_file:
            http.mount("https://", _CaAdapter(client_context(settings.ca_file)))
        response = http.post(
            url,
            data=b'{"base": {}, "requests": []}',
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": f"bulkmail/{__version__}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=(timeout, timeout),
            allow_redirects=False,
        )
    except requests.exceptions.Timeout:
        raise PreflightError(f"mailtrap {host}: no answer within {timeout:g} s") from None
    except requests.exceptions.SSLError as exc:
        raise PreflightError(f"mailtrap {host}: TLS failed: {_describe(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise PreflightError(f"mailtrap {host}: cannot connect: {_describe(exc)}") from None
    finally:
        if own:
            http.close()
    with response:
        status = response.status_code
        if status in (401, 403):
            raise PreflightError(
                f"mailtrap {host}: token rejected ({status} {_error_detail(response)}): check "
                "BULKMAIL_MAILTRAP_TOKEN or `token` under [mailtrap]"
            )
        if not (200 <= status < 300 or status in (400, 422)):
            raise PreflightError(
                f"mailtrap {host}: unexpected answer {status} {_error_detail(response)} "
                "(check api_url)"
            )
    where = f"sandbox inbox {inbox} at {host}" if inbox else host
    return (
        f"mailtrap {where} (HTTPS, token accepted)"
        if url.startswith("https")
        else (f"mailtrap {where} (token accepted)")
    )
