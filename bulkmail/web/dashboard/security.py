"""Who a request acts as, and whether it may: API tokens, page sessions, CSRF, the host
application's hook.

In order: an ``Authorization: Bearer TOKEN`` header (API clients; a wrong token is 401);
else a page session (the login stores the token's hash, so ``bulkmail token remove`` ends
it too); else the host application's ``app.config["BULKMAIL_PERMISSION_CHECK"]``, a callable
``check(role) -> bool``, for an admin site that registers the blueprint under its own login.
No identity is 401, the wrong role 403. A request that changes something on the strength of
a cookie (a session or the host's) must carry the session's CSRF token, in the
``X-CSRF-Token`` header or the form's ``csrf_token`` field, else 403.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from flask import current_app, g, jsonify, request, session
from flask.typing import ResponseReturnValue

from bulkmail.web.auth import Identity, allows, authenticate, check_hash
from bulkmail.web.dashboard.core import DashboardConfig

P = ParamSpec("P")
T = TypeVar("T")

CHECK = "BULKMAIL_PERMISSION_CHECK"
CURRENT_USER = "BULKMAIL_CURRENT_USER"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def config() -> DashboardConfig:
    cfg: DashboardConfig = current_app.extensions["bulkmail.dashboard"]
    return cfg


def csrf_token() -> str:
    """The session's CSRF token (made on first use), for every form and the pages' JS."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok() -> bool:
    expected = session.get("csrf")
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    return isinstance(expected, str) and hmac.compare_digest(expected, given)


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def identify(role: str) -> Identity:
    """The request's identity allowed ``role``, or ``Denied`` (401, 403)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        who = authenticate(config().store, token) if scheme.lower() == "bearer" else None
        if who is None:
            raise Denied(401, "unknown or revoked API token")
    else:
        who = _from_session() or _from_host(role)
        if who is None:
            raise Denied(401, "log in, or send an API token (Authorization: Bearer ...)")
        if request.method in UNSAFE and not csrf_ok():
            raise Denied(403, "missing or wrong CSRF token; reload the page")
    if not allows(who.role, role):
        raise Denied(403, f"the token {who.name!r} is a {who.role}; this needs a {role}")
    g.bulkmail_identity = who
    return who


def _from_session() -> Identity | None:
    token_hash = session.get("token_hash")
    if not isinstance(token_hash, str):
        return None
    who = check_hash(config().store, token_hash)
    if who is None:  # the token was removed: the session ends with it
        session.pop("token_hash", None)
    return who


def _from_host(role: str) -> Identity | None:
    check: Callable[[str], bool] | None = current_app.config.get(CHECK)
    if check is None:
        return None
    if not check(role):
        raise Denied(403, f"not allowed ({role} rights needed)")
    user: Callable[[], str] | None = current_app.config.get(CURRENT_USER)
    return Identity(str(user()) if user is not None else "host", role)


def api(role: str) -> Callable[[Callable[P, ResponseReturnValue]], Callable[P, Any]]:
    """An API view that needs ``role``: 401/403 as JSON ``{"error": ...}``."""

    def decorate(view: Callable[P, ResponseReturnValue]) -> Callable[P, Any]:
        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                identify(role)
            except Denied as denied:
                response = jsonify(error=denied.message)
                response.status_code = denied.status
                if denied.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="bulkmail"'
                return response
            return view(*args, **kwargs)

        return wrapper

    return decorate
