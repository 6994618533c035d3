"""The OpenAPI 3.1 description of the HTTP API, built from the same types the answers are
made of (``documents.JobDocument``): a key added to the job document appears here too."""

from __future__ import annotations

import types
import typing
from typing import Any

from bulkmail import __version__, documents

_JSON_TYPES: dict[Any, str] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _schema_of(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        schema = _schema_of(kinds[0])
        if len(kinds) < len(typing.get_args(annotation)):
            schema = {**schema, "type": [schema["type"], "null"]}
        return schema
    if origin is typing.NotRequired:
        return _schema_of(typing.get_args(annotation)[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        return {"type": "array", "items": _schema_of(item)}
    if origin is dict:
        return {"type": "object"}
    if typing.is_typeddict(annotation):
        return _typeddict(annotation)
    return {"type": _JSON_TYPES[annotation]}


def _typeddict(cls: Any) -> dict[str, Any]:
    # (``__required_keys__`` cannot see NotRequired in postponed annotations: read the hints)
    hints = typing.get_type_hints(cls, include_extras=True)
    optional = {k for k, h in hints.items() if typing.get_origin(h) is typing.NotRequired}
    return {
        "type": "object",
        "required": sorted(set(hints) - optional),
        "properties": {name: _schema_of(hint) for name, hint in hints.items()},
    }


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


_AUTH = {"401": _error("no or unknown token"), "403": _error("the token's role is not enough")}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}

_SOURCE_FIELDS: dict[str, Any] = {
    "csv": {"type": "string", "format": "binary", "description": "an uploaded CSV or .xlsx"},
    "source": {"type": "string", "description": "a source configured on the server"},
    "template": {"type": "string", "description": "a template configured on the server"},
    "template_text": {"type": "string", "description": "the text template itself (Jinja2)"},
    "html_template": {
        "type": "string",
        "description": "an HTML template configured on the server (as --html-template)",
    },
    "html_template_text": {
        "type": "string",
        "description": "the HTML template itself (Jinja2, autoescaped)",
    },
    "attach": {
        "type": "array",
        "items": {"type": "string"},
        "description": "files in the server's attachments folder, by name or by a pattern "
        "such as {{ course }}.pdf (as --attach); never a path",
    },
    "subject": {"type": "string", "description": "the subject template (Jinja2)"},
    "selected": {
        "type": "array",
        "items": {"type": "string"},
        "description": "addresses to send to (absent: everyone), as --only",
    },
    "on_empty": {"type": "string", "enum": ["skip", "fail", "send"]},
}
_SEND_FIELDS: dict[str, Any] = {
    "rate": {"type": "number"},
    "burst": {"type": "integer"},
    "max_retries": {"type": "integer"},
    "name": {"type": "string", "description": "the job's name (as --name)"},
    "dedupe_key": {"type": "string"},
    "per_hour": {"type": "integer"},
    "per_day": {"type": "integer"},
    "window": {"type": "array", "items": {"type": "string"}},
    "tz": {"type": "string"},
    "not_before": {"type": "string"},
    "not_after": {"type": "string"},
    "recheck": {
        "type": "boolean",
        "description": "with a course-database source: run its query again before each send "
        "and skip who it no longer returns (as --recheck)",
    },
}


def _body(properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": ["subject"], "properties": properties}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": schema},
            "application/json": {"schema": schema},
        },
    }


def document() -> dict[str, Any]:
    job = {"$ref": "#/components/schemas/JobDocument"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bulkmail HTTP API", "version": __version__},
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobDocument": _typeddict(documents.JobDocument),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Accepted": {
                    "type": "object",
                    "required": ["job_id", "status_url", "job"],
                    "properties": {
                        "job_id": {"type": "integer"},
                        "status_url": {"type": "string"},
                        "job": job,
                    },
                },
                "Recipients": {
                    "type": "object",
                    "required": ["source", "total", "to_send", "recipients", "rate", "burst"],
                    "properties": {
                        "source": {"type": "string"},
                        "total": {"type": "integer"},
                        "to_send": {"type": "integer"},
                        "rate": {"type": "number"},
                        "burst": {"type": "integer"},
                        "estimated_seconds": {"type": "number"},
                        "calendar": {"type": ["string", "null"]},
                        "recipients": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["row", "email", "name", "skip_reason"],
                                "properties": {
                                    "row": {"type": "integer"},
                                    "email": {"type": "string"},
                                    "name": {"type": "string"},
                                    "skip_reason": {"type": ["string", "null"]},
                                },
                            },
                        },
                    },
                },
                "Choices": {
                    "type": "object",
                    "required": ["sources", "templates", "attachments"],
                    "properties": {
                        name: {"type": "array", "items": {"type": "string"}}
                        for name in ("sources", "templates", "attachments")
                    },
                },
                "Preview": {
                    "type": "object",
                    "required": ["to", "skipped"],
                    "properties": {
                        "from": {"type": "string"},
                        "to": {"type": "string"},
                        "subject": {"type": "string"},
                        "text": {"type": "string"},
                        "html": {"type": ["string", "null"]},
                        "attachments": {"type": "array", "items": {"type": "string"}},
                        "skipped": {"type": ["string", "null"]},
                    },
                },
            },
        },
        "security": [{"token": []}],
        "paths": {
            "/api/bulk-email/send-instructor-reminders": {
                "post": {
                    "summary": "Create a reminder job and start a background worker (sender)",
                    "requestBody": _body({**_SOURCE_FIELDS, **_SEND_FIELDS}),
                    "responses": {
                        "202": _json("Accepted", "the job is created and its worker started"),
                        "400": _error("bad input: nothing created"),
                        "413": _error("request body too large"),
                        **_AUTH,
                    },
                }
            },
            "/api/bulk-email/recipients": {
                "post": {
                    "summary": "Every recipient of a source, with the skips (viewer)",
                    "requestBody": _body({**_SOURCE_FIELDS, **_SEND_FIELDS}),
                    "responses": {
                        "200": _json("Recipients", "a dry run"),
                        "400": _error("bad input"),
                        **_AUTH,
                    },
                }
            },
            "/api/bulk-email/preview": {
                "post": {
                    "summary": "One recipient's message, exactly as it will be sent (viewer)",
                    "requestBody": _body(
                        {**_SOURCE_FIELDS, "email": {"type": "string"}, **_SEND_FIELDS}
                    ),
                    "responses": {
                        "200": _json("Preview", "the message, or why the row is skipped"),
                        "400": _error("bad input"),
                        **_AUTH,
                    },
                }
            },
            "/api/bulk-email/sources": {
                "get": {
                    "summary": "The sources, templates and attachments a request may name (viewer)",
                    "responses": {"200": _json("Choices", "the configured names"), **_AUTH},
                }
            },
            "/api/bulk-email/job-status/{job_id}": {
                "get": {
                    "summary": "A job, as `bulkmail status --json` (viewer)",
                    "parameters": [
                        _JOB_ID,
                        {"name": "failed", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {
                        "200": _json("JobDocument", "the job"),
                        "404": _error("no such job"),
                        **_AUTH,
                    },
                }
            },
            "/api/bulk-email/recent-jobs": {
                "get": {
                    "summary": "The newest jobs, as `bulkmail recent --json` (viewer)",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}],
                    "responses": {
                        "200": {
                            "description": "newest first",
                            "content": {
                                "application/json": {"schema": {"type": "array", "items": job}}
                            },
                        },
                        "400": _error("bad limit"),
                        **_AUTH,
                    },
                }
            },
            **{
                f"/api/bulk-email/jobs/{{job_id}}/{action}": {
                    "post": {
                        "summary": f"{action.capitalize()} a job, as `bulkmail {action}` (sender)",
                        "parameters": [_JOB_ID],
                        "responses": {
                            "200": _json("JobDocument", "done (or nothing to do)"),
                            **(
                                {"202": _json("JobDocument", "a background worker started")}
                                if action != "cancel"
                                else {}
                            ),
                            "404": _error("no such job"),
                            "409": _error("not in this state"),
                            **_AUTH,
                        },
                    }
                }
                for action in ("cancel", "resume", "retry")
            },
            "/api/bulk-email/jobs/{job_id}/report": {
                "get": {
                    "summary": "One CSV row per delivery, as `bulkmail report` (viewer)",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {
                            "description": "the report",
                            "content": {"text/csv": {"schema": {"type": "string"}}},
                        },
                        "404": _error("no such job"),
                        **_AUTH,
                    },
                }
            },
        },
    }
