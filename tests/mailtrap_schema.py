"""Mailtrap's own request schemas and documented answers, from its OpenAPI file kept under
``tests/data/mailtrap/`` (source, commit and date in the README there).

``check_batch`` validates a ``/api/batch`` body against the spec's ``BatchEmail`` schema and
also each message as Mailtrap assembles it (``base`` overridden by the entry) against the
``/api/send`` body schema, so an entry that relies on ``base`` for its sender is still
checked for everything a message needs. The ``/api/send`` schema is a ``oneOf`` of text-only,
HTML-only and text-and-HTML variants, which a message with both parts matches more than once
(a slip in the spec): it is checked as ``anyOf``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC = Path(__file__).parent / "data" / "mailtrap" / "email-sending-transactional.openapi.yml"


@functools.cache
def spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    return doc


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    # refs are "#/components/schemas/...": resolved against a root holding the components
    root = {**schema, "components": spec()["components"]}
    return jsonschema.Draft202012Validator(root)


@functools.cache
def _batch() -> jsonschema.Draft202012Validator:
    return _validator({"$ref": "#/components/schemas/BatchEmail"})


@functools.cache
def _send() -> jsonschema.Draft202012Validator:
    body = spec()["paths"]["/api/send"]["post"]["requestBody"]["content"]["application/json"]
    return _validator({"anyOf": body["schema"]["oneOf"]})


def _errors(validator: jsonschema.Draft202012Validator, doc: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def send_problems(body: Any) -> list[str]:
    """What makes ``body`` an invalid ``/api/send`` request ([] when valid)."""
    return _errors(_send(), body)


def batch_problems(doc: Any) -> list[str]:
    """What makes ``doc`` an invalid ``/api/batch`` request ([] when valid)."""
    problems = _errors(_batch(), doc)
    if not problems:
        base = doc.get("base", {})
        for i, entry in enumerate(doc["requests"]):
            problems += [f"requests[{i}] {p}" for p in send_problems({**base, **entry})]
    return problems


def documented(status: int) -> dict[str, Any]:
    """The body the spec documents for an error ``status`` of ``/api/send`` (400, 401,
    403, 500)."""
    responses = spec()["paths"]["/api/send"]["post"]["responses"]
    ref = responses[str(status)]["$ref"].rsplit("/", 1)[-1]
    example: dict[str, Any] = spec()["components"]["responses"][ref]["content"]["application/json"][
        "example"
    ]
    return example
