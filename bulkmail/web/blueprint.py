"""``bulkmail.web.blueprint``: the dashboard and HTTP API as a Flask blueprint for an
existing Flask admin application, with the hook for its permission check.

    from bulkmail.web.blueprint import DashboardConfig, blueprint, init_app

    app.config["BULKMAIL_PERMISSION_CHECK"] = lambda role: current_user.is_admin
    init_app(app, DashboardConfig(store=open_store(...), sources=..., templates_dir=...))

See ``bulkmail.web.dashboard`` and ``examples/flask_admin_app.py``.
"""

from __future__ import annotations

from bulkmail.web.dashboard import DashboardConfig, NamedSource, blueprint, create_app, init_app
from bulkmail.web.dashboard.security import CHECK, CURRENT_USER

__all__ = [
    "CHECK",
    "CURRENT_USER",
    "DashboardConfig",
    "NamedSource",
    "blueprint",
    "create_app",
    "init_app",
]
