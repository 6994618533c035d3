"""``bulkmail serve``: the Flask app (the webhooks, and the HTTP API and the dashboard of
:mod:`bulkmail.web.dashboard` when configured) and its server, waitress. Flask and
waitress are the ``web`` extra and are imported only here, only by ``serve``.

``create_app(config)`` is a factory: the app gets its store and secrets from ``WebConfig``
and nothing is read at import time. ``serve`` refuses a non-loopback address unless a TLS
proxy is in front (``behind_proxy``): waitress itself speaks plain HTTP only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bulkmail.errors import ConfigError, InputError
from bulkmail.providers.tls import is_loopback

if TYPE_CHECKING:
    from flask import Flask

    from bulkmail.store.contract import JobStore
    from bulkmail.web.dashboard.core import DashboardConfig

__all__ = ["MAX_BODY", "WebConfig", "check_address", "create_app", "serve"]

MAX_BODY = 5 * 1024 * 1024  # a webhook body larger than this is refused (413)


@dataclass(frozen=True)
class WebConfig:
    store: JobStore
    mailtrap_webhook_secret: str
    max_body: int = MAX_BODY
    # the dashboard and its HTTP API (bulkmail.web.dashboard), served beside the webhooks
    dashboard: DashboardConfig | None = None


def _flask() -> type[Flask]:
    try:
        from flask import Flask
    except ImportError:
        raise ConfigError(
            "bulkmail serve needs Flask and waitress: pip install 'bulkmail[web]'"
        ) from None
    return Flask


def create_app(config: WebConfig) -> Flask:
    """The app, with the webhook blueprint at ``/webhooks``."""
    from bulkmail.web.webhooks import blueprint

    app = _flask()(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.extensions["bulkmail"] = config
    app.register_blueprint(blueprint, url_prefix="/webhooks")
    if config.dashboard is not None:
        from bulkmail.web.dashboard import init_app

        init_app(app, config.dashboard)
    return app


def check_address(host: str, *, behind_proxy: bool) -> None:
    """Refuse to listen beyond loopback without a TLS proxy in front: webhook bodies carry
    addresses, and waitress serves plain HTTP."""
    if not is_loopback(host) and not behind_proxy:
        raise InputError(
            f"--host {host}: refusing to serve plain HTTP beyond loopback; put a TLS proxy "
            "(nginx, caddy) in front and pass --behind-proxy"
        )


def serve(app: Flask, *, host: str, port: int, behind_proxy: bool, threads: int = 4) -> None:
    """Serve ``app`` with waitress until interrupted."""
    check_address(host, behind_proxy=behind_proxy)
    try:
        import waitress
    except ImportError:
        raise ConfigError(
            "bulkmail serve needs Flask and waitress: pip install 'bulkmail[web]'"
        ) from None
    kwargs: dict[str, object] = {}
    if behind_proxy:
        kwargs.update(trusted_proxy="127.0.0.1", trusted_proxy_headers={"x-forwarded-proto"})
    waitress.serve(
        app,
        host=host,
        port=port,
        threads=threads,
        max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]) + 1,
        ident="bulkmail",
        **kwargs,
    )
