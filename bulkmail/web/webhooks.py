"""``POST /webhooks/mailtrap``: Mailtrap's delivery events, signed with the webhook's
signing secret (``Mailtrap-Signature``: hex HMAC-SHA256 of the raw body), recorded against
their deliveries (:mod:`bulkmail.events`). A bad or missing signature is 401, a body over
the limit 413, a body that is not events 400; a duplicate event is recorded once."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, jsonify, request

from bulkmail import events
from bulkmail.errors import BulkmailError

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

    from bulkmail.web import WebConfig

blueprint = Blueprint("webhooks", __name__)


def _config() -> WebConfig:
    config: WebConfig = current_app.extensions["bulkmail"]
    return config


def _error(status: int, message: str) -> ResponseReturnValue:
    return jsonify({"success": False, "error": message}), status


@blueprint.post("/mailtrap")
def mailtrap() -> ResponseReturnValue:
    config = _config()
    assert config.mailtrap_webhook_secret  # the blueprint is registered only with one
    body = request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH
    if not events.signature_ok(
        config.mailtrap_webhook_secret, body, request.headers.get("Mailtrap-Signature")
    ):
        return _error(401, "bad or missing Mailtrap-Signature")
    try:
        found = events.parse_payload(body, where="webhook body")
    except BulkmailError as exc:
        return _error(400, exc.message)
    try:
        summary = events.record(config.store, found, now=time.time())
    except BulkmailError as exc:  # the store: Mailtrap retries a failed delivery
        current_app.logger.error("bulkmail: %s", exc.message)
        return _error(503, "the job store is unavailable")
    doc: dict[str, Any] = {"success": True, **vars(summary)}
    return jsonify(doc), 200
