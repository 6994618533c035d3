"""The admin dashboard: the HTTP API under ``/api/bulk-email/`` and the pages under
``/dashboard/``, as one Flask blueprint (``blueprint``) that ``bulkmail serve`` mounts and an
existing Flask admin application can register under its own login.

Set it up with ``init_app(app, DashboardConfig(store=...))``: it registers the blueprint,
keeps the configuration in ``app.extensions["bulkmail.dashboard"]``, limits request bodies
(``MAX_CONTENT_LENGTH``, 10 MB unless the app set one) and makes the session cookie HttpOnly
and SameSite=Strict. Who may do what (``bulkmail.web.security``): an API token (``Authorization:
Bearer ...``), a page login with the same tokens, or the host application's own check, a
callable ``check(role) -> bool`` in ``app.config["BULKMAIL_PERMISSION_CHECK"]`` (and, for the
name recorded on the jobs it creates, ``app.config["BULKMAIL_CURRENT_USER"]``, a callable
returning the user's name); see ``examples/flask_admin_app.py``.

Standalone (tests, or before ``bulkmail serve`` mounts it): ``python -m bulkmail.web.dashboard
--store PATH --source NAME=CSV --templates DIR --port 0``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Blueprint, Flask

from bulkmail.web.dashboard.core import DashboardConfig, NamedSource, Upload

__all__ = [
    "DashboardConfig",
    "NamedSource",
    "Upload",
    "blueprint",
    "create_app",
    "init_app",
]

_HERE = Path(__file__).resolve().parent.parent  # bulkmail/web

blueprint = Blueprint(
    "bulkmail_dashboard",
    __name__,
    template_folder=str(_HERE / "templates"),
    static_folder=str(_HERE / "static"),
    static_url_path="/dashboard/static",
)

EXTENSION = "bulkmail.dashboard"


def init_app(app: Flask, config: DashboardConfig) -> None:
    """Register the dashboard on ``app`` with ``config`` (see the module docstring)."""
    app.extensions[EXTENSION] = config
    if not app.config.get("SECRET_KEY"):
        # a random key per process when none is configured: sessions end at a restart
        app.config["SECRET_KEY"] = (
            config.secret_key
            or os.environ.get("BULKMAIL_DASHBOARD_SECRET_KEY")
            or secrets.token_hex(32)
        )
    if not app.config.get("MAX_CONTENT_LENGTH"):
        app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    app.register_blueprint(blueprint)


def create_app(config: DashboardConfig) -> Flask:
    """A Flask app serving only the dashboard (tests; ``bulkmail serve`` has its own)."""
    app = Flask("bulkmail.web.dashboard")
    init_app(app, config)
    return app


# the routes register themselves on `blueprint`
from bulkmail.web.dashboard import api, pages  # noqa: E402

__all__ += ["api", "pages"]
