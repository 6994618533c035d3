"""An existing Flask admin application that mounts bulkmail's dashboard and HTTP API under
its own login, with its own permission check (the hook of ``bulkmail.web.blueprint``).

    pip install 'bulkmail[web]'
    BULKMAIL_STORE=jobs.db flask --app 'examples.flask_admin_app:create_app()' run

The host decides who may do what: ``BULKMAIL_PERMISSION_CHECK`` is called with the role an
endpoint needs (``viewer`` to read, ``sender`` to create, cancel, resume or retry) and
answers True or False; ``BULKMAIL_CURRENT_USER`` names the user recorded on the jobs they
create. API tokens (``bulkmail token add NAME --role sender``) keep working beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, session

from bulkmail.store import open_store
from bulkmail.web.blueprint import CHECK, CURRENT_USER, DashboardConfig, NamedSource, init_app

HERE = Path(__file__).resolve().parent


def current_role() -> str | None:
    """The host's own idea of the logged-in user's rights (here: a session key its login
    sets; a real app asks flask-login or its user table)."""
    role = session.get("admin_role")
    return role if isinstance(role, str) else None


def may(role: str) -> bool:
    """The host's permission check: admins may send, staff may only look."""
    mine = current_role()
    return mine == "admin" or (mine == "staff" and role == "viewer")


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("ADMIN_SECRET_KEY", "change me")
    app.config[CHECK] = may
    app.config[CURRENT_USER] = lambda: str(session.get("admin_user", "admin"))
    init_app(
        app,
        DashboardConfig(
            store=open_store(os.environ.get("BULKMAIL_STORE", "jobs.db"), create=False),
            sources={"instructors": NamedSource(csv=str(HERE / "instructors.csv"))},
            templates_dir=HERE,  # reminder.txt (and any other file here) as a template
        ),
    )

    @app.get("/")
    def home() -> str:
        return '<a href="/dashboard/">Reminder emails</a>'

    return app


if __name__ == "__main__":
    create_app().run()
