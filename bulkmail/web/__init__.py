"""``bulkmail serve``: the Flask app (the webhooks, and the HTTP API and the dashboard of
:mod:`bulkmail.web.dashboard` when configured) and its server. Flask and the servers are the
``web`` extra and are imported only here, only by ``serve``.

``create_app(config)`` is a factory: the app gets its store and secrets from ``WebConfig``
and nothing is read at import time. ``serve`` refuses a non-loopback address unless the
connection is encrypted: by bulkmail itself (``--cert/--key``: ``load_tls``) or by a TLS proxy
in front (``behind_proxy``). Plain HTTP is served by waitress; HTTPS by cheroot, because
waitress has no TLS at all.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkmail.errors import ConfigError, InputError, file_error
from bulkmail.providers.tls import is_loopback

if TYPE_CHECKING:
    from flask import Flask

    from bulkmail.config import ServeSettings
    from bulkmail.store.contract import JobStore
    from bulkmail.web.dashboard.core import DashboardConfig

__all__ = [
    "MAX_BODY",
    "Tls",
    "WebConfig",
    "check_address",
    "choose_tls",
    "create_app",
    "load_tls",
    "serve",
]

MAX_BODY = 5 * 1024 * 1024  # a webhook body larger than this is refused (413)


@dataclass(frozen=True)
class WebConfig:
    store: JobStore
    # None: no signing secret configured, so no webhook route (a dashboard-only server)
    mailtrap_webhook_secret: str | None
    max_body: int = MAX_BODY
    # the dashboard and its HTTP API (bulkmail.web.dashboard), served beside the webhooks
    dashboard: DashboardConfig | None = None
    # the browser reaches the app over https (--cert/--key, or --behind-proxy): the session
    # cookie is marked Secure, so it never travels over plain HTTP
    https: bool = False


def _flask() -> type[Flask]:
    """Flask, or the one line saying how to install the ``web`` extra (call this before
    importing any module of this package that imports Flask)."""
    try:
        from flask import Flask
    except ImportError:
        raise ConfigError(
            "bulkmail serve needs Flask and waitress: pip install 'bulkmail[web]'"
        ) from None
    return Flask


def require_web() -> None:
    """Exit 2 with the install line when the ``web`` extra is missing."""
    _flask()


def create_app(config: WebConfig) -> Flask:
    """The app, with the webhook blueprint at ``/webhooks``."""
    from bulkmail.web.webhooks import blueprint

    app = _flask()(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.extensions["bulkmail"] = config
    if config.mailtrap_webhook_secret:
        app.register_blueprint(blueprint, url_prefix="/webhooks")
    if config.dashboard is not None:
        from bulkmail.web.dashboard import init_app

        init_app(app, config.dashboard)
    if config.https:
        app.config["SESSION_COOKIE_SECURE"] = True
    return app


@dataclass(frozen=True)
class Tls:
    """The certificate and key ``serve`` encrypts with, checked (``load_tls``)."""

    cert: Path
    key: Path
    context: ssl.SSLContext


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # called only for an encrypted key: serve never asks for a passphrase on the terminal
    raise _EncryptedKey


def load_tls(cert: Path, key: Path) -> Tls:
    """The server TLS context for ``cert`` (PEM certificate chain, the server's first) and
    ``key`` (its unencrypted PEM private key): TLS 1.2 at least, the standard library's
    default ciphers. Every fault is one line naming the file: missing or unreadable, not a
    certificate or a key, a key that does not match the certificate."""
    for path, what in ((cert, "a PEM certificate"), (key, "a PEM private key")):
        try:
            path.read_bytes()
        except OSError as exc:
            raise file_error(f"{_shown(path)}", exc, what) from None
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cadata=cert.read_bytes().decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise InputError(f"{_shown(cert)}: not a PEM certificate") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise InputError(
            f"{_shown(key)}: the private key is encrypted; give an unencrypted one "
            "(openssl pkey -in KEY -out PLAIN.key), readable only by this user"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise InputError(
                f"{_shown(key)}: this private key does not match the certificate {_shown(cert)}"
            ) from None
        raise InputError(f"{_shown(key)}: not a PEM private key") from None
    return Tls(cert=cert, key=key, context=context)


def choose_tls(cert: Path | None, key: Path | None, configured: ServeSettings) -> Tls | None:
    """The TLS of ``serve``: ``--cert/--key`` (both or neither), else ``[serve]`` cert and
    key of the config file (both or neither), else none (plain HTTP)."""
    if cert is not None or key is not None:
        if cert is None or key is None:
            given, missing = ("--cert", "--key") if key is None else ("--key", "--cert")
            raise InputError(f"{given} needs {missing} too: HTTPS takes a certificate and its key")
        return load_tls(cert, key)
    if configured.cert or configured.key:
        if not (configured.cert and configured.key):
            raise ConfigError(
                "[serve] cert and key go together (or BULKMAIL_SERVE_CERT and "
                "BULKMAIL_SERVE_KEY): HTTPS takes a certificate and its key"
            )
        return load_tls(Path(configured.cert), Path(configured.key))
    return None


def _shown(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)[1:-1]


def check_address(host: str, *, behind_proxy: bool, tls: bool = False) -> None:
    """Refuse to listen beyond loopback in plain HTTP: webhook bodies carry addresses, and
    the dashboard its session. Beyond loopback needs ``tls`` (``--cert/--key``) or a TLS proxy
    in front (``behind_proxy``)."""
    if not is_loopback(host) and not behind_proxy and not tls:
        raise InputError(
            f"--host {host}: refusing to serve plain HTTP beyond loopback; give a certificate "
            "(--cert FILE --key FILE) or put a TLS proxy (nginx, caddy) in front and pass "
            "--behind-proxy"
        )


def _missing_server(name: str) -> ConfigError:
    return ConfigError(f"bulkmail serve needs {name}: pip install 'bulkmail[web]'")


def serve(
    app: Flask,
    *,
    host: str,
    port: int,
    behind_proxy: bool,
    tls: Tls | None = None,
    threads: int = 4,
) -> None:
    """Serve ``app`` until interrupted: with waitress in plain HTTP, with cheroot in HTTPS
    when ``tls`` is given."""
    check_address(host, behind_proxy=behind_proxy, tls=tls is not None)
    if tls is not None:
        _serve_tls(app, host=host, port=port, tls=tls, threads=threads)
        return
    try:
        import waitress
    except ImportError:
        raise _missing_server("Flask and waitress") from None
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


def _serve_tls(app: Flask, *, host: str, port: int, tls: Tls, threads: int) -> None:
    """HTTPS with cheroot's WSGI server and our context (TLS 1.2+, default ciphers), the
    handshake on a worker thread (``_tls_classes``). Ctrl-C or SIGTERM (a KeyboardInterrupt in
    this, the main thread) stops it: the listening socket closed, the workers joined."""
    try:
        from cheroot import wsgi
    except ImportError:
        raise _missing_server("cheroot for --cert/--key") from None
    adapter_class, connection_class = _tls_classes()
    server = wsgi.Server((host, port), app, numthreads=threads, server_name="bulkmail")
    # the same limits as waitress: Flask answers 413 past MAX_CONTENT_LENGTH
    server.max_request_body_size = int(app.config["MAX_CONTENT_LENGTH"]) + 1
    server.max_request_header_size = 256 * 1024
    adapter = adapter_class(str(tls.cert), str(tls.key))
    adapter.context = tls.context
    server.ssl_adapter = adapter
    server.ConnectionClass = connection_class
    try:
        try:
            server.prepare()
        except OSError as exc:
            raise InputError(f"--host {host} --port {port}: cannot listen ({exc})") from None
        server.serve()
    finally:
        server.stop()


HANDSHAKE_TIMEOUT = 5.0  # seconds a TLS client has to complete its handshake


def _tls_classes() -> tuple[type[Any], type[Any]]:
    """cheroot's TLS adapter and connection, changed so the TLS handshake happens on the
    worker thread that serves the connection. cheroot's own adapter shakes hands in the one
    thread that accepts connections, so a client that connects and sends nothing stalled
    every other client for the socket timeout (10 s). Here ``wrap`` only wraps, and the
    connection shakes hands before its first request; a failed handshake (plain HTTP, a
    client that does not trust the certificate, a timeout) just closes the connection."""
    from cheroot.server import HTTPConnection
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    class Adapter(BuiltinSSLAdapter):
        def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
            wrapped = self.context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
            return wrapped, {"wsgi.url_scheme": "https", "HTTPS": "on"}

    class Connection(HTTPConnection):
        handshaken = False

        def communicate(self) -> bool:
            if not self.handshaken:
                before = self.socket.gettimeout()
                try:
                    # a client that stalls mid-handshake holds a worker thread this long
                    # at most, not the whole socket timeout
                    self.socket.settimeout(HANDSHAKE_TIMEOUT)
                    self.socket.do_handshake()
                    self.socket.settimeout(before)
                except OSError:  # ssl.SSLError and timeouts included
                    return False
                self.handshaken = True
            keep_open: bool = super().communicate()  # type: ignore[no-untyped-call]
            return keep_open

    return Adapter, Connection
