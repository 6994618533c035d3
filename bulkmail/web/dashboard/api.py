"""The HTTP API, JSON under ``/api/bulk-email/``: every answer in the shape of the CLI's
``--json`` (``bulkmail.documents.job_document``); errors as ``{"error": "one line"}`` with the
CLI's messages (400 bad input, 401/403 permissions, 404 unknown job, 409 the job's state
forbids it, 413 body too large). Described in ``openapi.json`` (``bulkmail.web.dashboard.
openapi``)."""

from __future__ import annotations

import io
from typing import Any

from flask import Response, g, jsonify, request, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from bulkmail.errors import BulkmailError, JobNotFound, JobStateError
from bulkmail.web.dashboard import blueprint, core, openapi
from bulkmail.web.dashboard.security import api, config

PREFIX = "/api/bulk-email"


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


@blueprint.errorhandler(BulkmailError)
def _domain_error(exc: BulkmailError) -> Response:
    if isinstance(exc, JobNotFound):
        return _error(404, exc.message)
    if isinstance(exc, JobStateError):
        return _error(409, exc.message)
    return _error(400, exc.message)


@blueprint.errorhandler(RequestEntityTooLarge)
def _too_large(exc: RequestEntityTooLarge) -> Response:
    limit = config().max_body
    return _error(413, f"request body too large: at most {limit // (1024 * 1024)} MB")


@blueprint.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _error(exc.code or 500, exc.description or exc.name)


def _form() -> tuple[core.Form, core.Upload | None]:
    """The request's fields (a multipart or urlencoded form, or JSON with the same names)
    and its uploaded CSV."""
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BulkmailError("the JSON body must be an object of fields")
        form: dict[str, list[str]] = {}
        for key, value in body.items():
            values = value if isinstance(value, list) else [value]
            form[key] = ["" if v is None else str(v) for v in values]
        return form, None
    fields = {key: request.form.getlist(key) for key in request.form if key != "csrf_token"}
    file = request.files.get("csv")
    upload = None
    if file is not None and (file.filename or file.content_length):
        upload = core.Upload(file.filename or "upload.csv", file.read())
    return fields, upload


def _status_url(job_id: int) -> str:
    return url_for("bulkmail_dashboard.job_status", job_id=job_id)


@blueprint.post(f"{PREFIX}/send-instructor-reminders")
@api("sender")
def send_instructor_reminders() -> Any:
    who = g.bulkmail_identity  # set by @api
    form, upload = _form()
    started = core.send(config(), form, upload, who)
    url = _status_url(started.job_id)
    body = {"job_id": started.job_id, "status_url": url, "job": started.document}
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = url
    return response


@blueprint.post(f"{PREFIX}/recipients")
@api("viewer")
def recipients() -> Any:
    """Every recipient of a source with the skips and the time a send would take (the
    "New reminder" page's table): a dry run, nothing is created."""
    form, upload = _form()
    return jsonify(core.inspect(config(), form, upload))


@blueprint.post(f"{PREFIX}/preview")
@api("viewer")
def preview() -> Any:
    form, upload = _form()
    return jsonify(core.preview(config(), form, upload))


@blueprint.get(f"{PREFIX}/sources")
@api("viewer")
def sources() -> Any:
    """The sources, templates and attachments configured on the server, by name."""
    return jsonify(core.choices(config()))


@blueprint.get(f"{PREFIX}/job-status/<int:job_id>")
@api("viewer")
def job_status(job_id: int) -> Any:
    failed = request.args.get("failed", "") in ("1", "true", "yes")
    return jsonify(core.status(config().store, job_id, failed=failed))


@blueprint.get(f"{PREFIX}/recent-jobs")
@api("viewer")
def recent_jobs() -> Any:
    text = request.args.get("limit", "10")
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        return _error(400, f"--limit: must be a whole number from 1 to 1000, got {text!r}")
    return jsonify(core.recent(config().store, limit))


@blueprint.post(f"{PREFIX}/jobs/<int:job_id>/cancel")
@api("sender")
def cancel(job_id: int) -> Any:
    return jsonify(core.cancel(config().store, job_id))


def _started(started: bool, doc: Any) -> Any:
    response = jsonify(doc)
    response.status_code = 202 if started else 200
    return response


@blueprint.post(f"{PREFIX}/jobs/<int:job_id>/resume")
@api("sender")
def resume(job_id: int) -> Any:
    return _started(*core.resume(config(), job_id))


@blueprint.post(f"{PREFIX}/jobs/<int:job_id>/retry")
@api("sender")
def retry(job_id: int) -> Any:
    return _started(*core.retry(config(), job_id))


@blueprint.get(f"{PREFIX}/jobs/<int:job_id>/report")
@api("viewer")
def report(job_id: int) -> Any:
    from bulkmail import documents

    out = io.StringIO()
    documents.write_report(config().store, job_id, out)
    return Response(
        out.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}-report.csv"'},
    )


@blueprint.get(f"{PREFIX}/openapi.json")
def openapi_json() -> Any:
    """The API's description: public, like any API's documentation (no job data)."""
    return jsonify(openapi.document())
