"""SMTP transport over the standard library's smtplib.

One connection is opened lazily on the first message and reused; it is re-opened after
``max_per_connection`` messages and, transparently, when the server dropped it while idle.
The transaction is driven step by step (MAIL, RCPT, DATA, content) rather than through
``sendmail`` because the step at which a failure happens decides its meaning: a connection
lost before the message content was handed over is a plain transient failure, one lost
after it leaves the outcome unknown (the server may have accepted the message).

What is sent depends on what the server offers: 7-bit content when it lacks 8BITMIME
(RFC 6152), ``SIZE=`` on MAIL FROM when it offers SIZE (RFC 1870), a message over its
advertised SIZE refused before anything of it is sent, and one AUTH mechanism per login
(``auth_method``), so a wrong password costs one failed attempt, not one per mechanism.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
from collections.abc import Callable

from bulkmail.mime import to_bytes_fast
from bulkmail.models import Message
from bulkmail.providers.base import (
    FatalError,
    PermanentError,
    ProviderError,
    TransientError,
    is_throttling,
)
from bulkmail.providers.settings import SMTP_SECURITY, SmtpSettings
from bulkmail.providers.tls import ca_file_problem, client_context, is_loopback, plaintext_problem
from bulkmail.store.records import parse_message_id

__all__ = ["SmtpFactory", "SmtpProvider", "check", "config_problem", "is_loopback"]

CA_FILE_SETTING = "ca_file under [smtp] (BULKMAIL_SMTP_CA_FILE)"
AUTH_METHOD_SETTING = "auth_method under [smtp] (BULKMAIL_SMTP_AUTH_METHOD)"
AUTH_METHODS = ("auto", "plain", "login", "cram-md5")
"""The values of ``auth_method``: ``auto`` is the first of PLAIN, LOGIN the server offers."""
_AUTO_MECHANISMS = ("PLAIN", "LOGIN")

SmtpFactory = Callable[[SmtpSettings], smtplib.SMTP]
"""Opens a connection (up to and including the server's greeting) for these settings."""


def _open_connection(settings: SmtpSettings) -> smtplib.SMTP:
    if settings.security == "tls":
        return smtplib.SMTP_SSL(
            settings.host,
            settings.port,
            timeout=settings.timeout,
            context=client_context(settings.ca_file),
        )
    return smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout)


class _LostAtMailFrom(Exception):
    """The connection failed at the first command of a transaction (nothing was handed
    over): on a reused connection this is how a server's idle disconnect shows up."""


class SmtpProvider:
    """Delivers messages over SMTP; see the module docstring for the connection policy."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings, *, smtp_factory: SmtpFactory | None = None):
        self._settings = settings
        self._factory = smtp_factory or _open_connection
        self._where = f"{settings.host}:{settings.port}"
        self._conn: smtplib.SMTP | None = None
        self._sent_on_conn = 0

    def send(self, message: Message) -> str | None:
        reused = self._conn is not None
        try:
            reply = self._send_once(message)
        except _LostAtMailFrom as lost:
            if not reused:
                raise TransientError(str(lost)) from None
            # The server dropped the idle connection: nothing of this message reached it,
            # so one retry on a fresh connection is safe.
            try:
                reply = self._send_once(message)
            except _LostAtMailFrom as again:
                raise TransientError(str(again)) from None
        return _queue_id(reply)

    def connect(self) -> None:
        """Open (EHLO, STARTTLS, login) the connection the next message will use."""
        self._connection()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                pass
            finally:
                conn.close()

    # -- one transaction ------------------------------------------------------------------

    def _send_once(self, message: Message) -> str:
        """Run one MAIL/RCPT/DATA transaction; returns the final reply's text."""
        conn = self._connection()
        try:
            seven_bit = not conn.has_extn("8bitmime")
            payload = _wire_data(to_bytes_fast(message, seven_bit=seven_bit))
            self._check_size(conn, payload)
            return self._transact(conn, message, payload)
        finally:
            if self._conn is conn:
                self._sent_on_conn += 1
                limit = self._settings.max_per_connection
                if limit > 0 and self._sent_on_conn >= limit:
                    self.close()

    def _transact(self, conn: smtplib.SMTP, message: Message, payload: bytes) -> str:
        step = "MAIL FROM"
        try:
            sender = envelope_sender(self._settings.return_path, message)
            code, resp = conn.mail(sender, _mail_options(conn, message, payload))
            if code != 250:
                raise self._rejected(conn, code, resp, step)
            step = "RCPT TO"
            code, resp = conn.rcpt(message.to_email)
            if code not in (250, 251):
                raise self._rejected(conn, code, resp, step)
            for copy in message.envelope_copies:
                # the office's copy (Cc, Bcc): one refused does not hold up the reminder
                conn.rcpt(copy)
            step = "DATA"
            code, resp = conn.docmd("DATA")
            if code != 354:
                raise self._rejected(conn, code, resp, step)
            step = "content"
            conn.send(payload)
            code, resp = conn.getreply()
        except smtplib.SMTPNotSupportedError as exc:
            # mail() refuses SMTPUTF8 when the server lacks it: nothing was sent.
            raise PermanentError(f"{_exc_text(exc)} (needed for a non-ASCII address)") from None
        except OSError as exc:  # includes SMTPServerDisconnected, timeouts, ssl errors
            self._drop()
            if step == "content":
                raise TransientError(
                    f"connection to {self._where} lost after the message data was sent; "
                    f"the server may have accepted it: {_exc_text(exc)}",
                    outcome_unknown=True,
                ) from None
            text = f"connection to {self._where} lost at {step}: {_exc_text(exc)}"
            if step == "MAIL FROM":
                raise _LostAtMailFrom(text) from None
            raise TransientError(text) from None
        if code != 250:
            raise self._rejected(conn, code, resp, step)
        return _decode(resp)

    def _check_size(self, conn: smtplib.SMTP, payload: bytes) -> None:
        """Refuse, before MAIL FROM, a message over the server's advertised SIZE: it would
        be refused after its upload, or at MAIL FROM (RFC 1870)."""
        limit = _size_limit(conn)
        size = _message_size(payload)
        if limit is not None and size > limit:
            raise PermanentError(
                f"message of {size} bytes is larger than the {limit} bytes SMTP server "
                f"{self._where} accepts (its SIZE limit)"
            )

    def _rejected(self, conn: smtplib.SMTP, code: int, resp: bytes, step: str) -> Exception:
        """The error for a non-success reply; leaves the connection usable or dropped."""
        text = _reply_text(code, resp)
        throttled = is_throttling(code, text)
        if code == 421:  # the server is closing the connection
            self._drop()
            if step == "MAIL FROM" and not throttled:  # typically an idle timeout on reuse
                return _LostAtMailFrom(text)
            return TransientError(text, throttled=throttled)
        if step != "content":  # after the final reply there is no transaction to reset
            self._reset(conn)
        if code == 530:  # RFC 4954 "authentication required": true of every message
            return FatalError(
                f"SMTP server {self._where} requires authentication: set the username and "
                f"password ({text})"
            )
        if 500 <= code <= 599:
            return PermanentError(text)
        if not 400 <= code <= 499:  # not a valid reply here: protocol state is unknown
            self._drop()
            text = f"unexpected reply to {step} from {self._where}: {text}"
        return TransientError(text, throttled=throttled)

    def _reset(self, conn: smtplib.SMTP) -> None:
        try:
            code, _ = conn.rset()
        except OSError:
            code = 0
        if code != 250:
            self._drop()

    # -- connection -----------------------------------------------------------------------

    def _connection(self) -> smtplib.SMTP:
        if self._conn is None:
            self._conn = self._open()
            self._sent_on_conn = 0
        return self._conn

    def _drop(self) -> None:
        """Forget the connection without QUIT: the next message opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _open(self) -> smtplib.SMTP:
        s = self._settings
        problem = config_problem(s)
        if problem is not None:
            raise FatalError(problem)
        try:
            conn = self._factory(s)
        except OSError as exc:  # smtplib's and ssl's errors are OSErrors too
            raise self._setup_error(exc, f"cannot connect to {self._where}") from None
        try:
            conn.ehlo_or_helo_if_needed()
            if s.security == "starttls":
                if not conn.has_extn("starttls"):
                    raise FatalError(
                        f"SMTP server {self._where} does not offer STARTTLS: set security to "
                        "'tls' if it expects TLS from the start, or check host and port"
                    )
                conn.starttls(context=client_context(s.ca_file))
                conn.ehlo_or_helo_if_needed()
            if s.username:
                self._login(conn)
        except smtplib.SMTPAuthenticationError as exc:
            conn.close()
            if 400 <= exc.smtp_code <= 499:  # e.g. 454 temporary authentication failure
                raise TransientError(f"SMTP login failed: {_exc_text(exc)}") from None
            raise FatalError(
                f"SMTP login rejected for user {s.username}: {_exc_text(exc)}"
            ) from None
        except OSError as exc:
            conn.close()
            raise self._setup_error(exc, f"SMTP session setup with {self._where} failed") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _login(self, conn: smtplib.SMTP) -> None:
        """AUTH with one mechanism (``auth_method``; ``auto``: the first of PLAIN, LOGIN the
        server offers), unlike ``smtplib.SMTP.login``, which tries each mechanism in turn:
        a wrong password must cost one failed login, not one per mechanism (lockouts)."""
        s = self._settings
        offered = conn.esmtp_features.get("auth", "").upper().split()
        if not conn.has_extn("auth") or not offered:
            raise FatalError(
                f"SMTP server {self._where} does not offer AUTH, but a username is set: "
                "remove the username, or check security, host and port"
            )
        wanted = s.auth_method.strip().lower() or "auto"
        if wanted == "auto":
            mechanism = next((m for m in _AUTO_MECHANISMS if m in offered), None)
        else:
            mechanism = wanted.upper() if wanted.upper() in offered else None
        if mechanism is None:
            choices = "PLAIN or LOGIN" if wanted == "auto" else wanted.upper()
            raise FatalError(
                f"SMTP server {self._where} offers AUTH {' '.join(offered)}, not {choices}: "
                f"set {AUTH_METHOD_SETTING} to one of those"
            )
        conn.user, conn.password = s.username, s.password
        authobject = getattr(conn, "auth_" + mechanism.lower().replace("-", "_"))
        conn.auth(mechanism, authobject)  # raises SMTPAuthenticationError unless 235/503

    def _setup_error(self, exc: OSError, context: str) -> ProviderError:
        """Classify a failure while connecting, greeting, securing or logging in."""
        text = f"{context}: {_exc_text(exc)}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            hint = "" if self._settings.ca_file else f"; a private CA: set {CA_FILE_SETTING}"
            return FatalError(f"TLS failure with {self._where}: {_exc_text(exc)}{hint}")
        if isinstance(exc, ssl.SSLError):
            return FatalError(f"TLS failure with {self._where}: {_exc_text(exc)}")
        if isinstance(exc, smtplib.SMTPResponseException):
            # 4xx (e.g. 421 busy) is worth retrying; a 5xx greeting/EHLO/login reply means
            # this server will not serve us with this configuration.
            if 400 <= exc.smtp_code <= 499:
                return TransientError(text)
            return FatalError(text, local=True)  # refused this host: others may go on
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            return TransientError(text)
        if isinstance(exc, smtplib.SMTPException):  # e.g. no usable AUTH mechanism
            return FatalError(text)
        # refused, DNS failure, timeout: the server is down, this recipient untried
        return TransientError(text, unreachable=True)


def envelope_sender(return_path: str, message: Message) -> str:
    """The MAIL FROM address: the sender's, or with a VERP ``return_path``
    (``bounces+{token}@example.edu``) that address naming the delivery, JOB.POSITION.TOKEN
    of its Message-ID, so a bounce finds it even without the returned headers. A message
    that is not a delivery's (a --test-to message) keeps the sender's address."""
    parsed = parse_message_id(message.message_id) if return_path else None
    if parsed is None:
        return message.from_email
    job, position, token = parsed
    return return_path.replace("{token}", f"{job}.{position}.{token}")


def config_problem(s: SmtpSettings) -> str | None:
    """What makes these settings unusable before any connection is tried, or None (checked
    when a job is planned, so a bad setting never creates a job, and again at connect)."""
    if s.security not in SMTP_SECURITY:
        return f"unknown SMTP security {s.security!r}: use one of {', '.join(SMTP_SECURITY)}"
    if not 0 < s.port < 65536:
        return f"SMTP port {s.port} is not a TCP port (1-65535): check BULKMAIL_SMTP_PORT"
    if not s.host.strip():
        return "no SMTP host: set BULKMAIL_SMTP_HOST or `host` under [smtp]"
    if s.return_path and (s.return_path.count("{token}") != 1 or "@" not in s.return_path):
        return (
            f"SMTP return_path {s.return_path!r}: must be an address holding {{token}} once, "
            "e.g. bounces+{token}@example.edu (BULKMAIL_SMTP_RETURN_PATH)"
        )
    if s.auth_method.strip().lower() not in (*AUTH_METHODS, ""):
        return (
            f"unknown SMTP auth_method {s.auth_method!r}: use one of {', '.join(AUTH_METHODS)} "
            "(BULKMAIL_SMTP_AUTH_METHOD)"
        )
    if s.username and s.security == "none":
        problem = plaintext_problem(
            f"the SMTP password of {s.username}", s.host, "set security to 'starttls' or 'tls'"
        )
        if problem is not None:
            return problem
    return ca_file_problem(s.ca_file, CA_FILE_SETTING)


def _mail_options(conn: smtplib.SMTP, message: Message, payload: bytes) -> list[str]:
    options = []
    if conn.has_extn("size"):
        options.append(f"SIZE={_message_size(payload)}")
    if not payload.isascii() and conn.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if not (message.from_email + message.to_email).isascii():
        options.append("SMTPUTF8")  # mail() raises SMTPNotSupportedError if not offered
    return options


def _wire_data(data: bytes) -> bytes:
    """The DATA content as sent: CRLF line ends, leading dots doubled, final "."."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    data = re.sub(rb"(?m)^\.", b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _message_size(payload: bytes) -> int:
    """The size declared with SIZE=: the DATA content without its final ".\r\n"."""
    return len(payload) - 3


def _size_limit(conn: smtplib.SMTP) -> int | None:
    """The largest message the server accepts (its EHLO ``SIZE n``), or None: no SIZE, or
    ``SIZE``/``SIZE 0`` (no fixed limit)."""
    if not conn.has_extn("size"):
        return None
    value = conn.esmtp_features.get("size", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _queue_id(reply: str) -> str | None:
    """The id in a reply such as "2.0.0 Ok: queued as 4F2A1B3C", if there is one."""
    found = re.search(r"queued as\s+<?([^\s<>;,]+)", reply, re.IGNORECASE)
    return found.group(1) if found else None


def _decode(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(text.split())


def _reply_text(code: int, resp: bytes | str) -> str:
    """One readable line: "550 5.1.1 mailbox unavailable"."""
    return f"{code} {_decode(resp)}".strip()


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply_text(exc.smtp_code, exc.smtp_error)
    return _decode(str(exc)) or type(exc).__name__


# --------------------------------------------------------------------------- pre-flight


class _Probe(smtplib.SMTP):
    """An SMTP connection that remembers whether its TCP connection was made, so that a
    timeout waiting for the greeting ("not SMTP") is told apart from one connecting."""

    connected = False

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self._host = host  # STARTTLS checks the certificate against it (smtplib sets it only
        # when the host is given to the constructor)
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self.connected = True
        return sock


class _ProbeTls(smtplib.SMTP_SSL):
    """``_Probe`` for implicit TLS: ``tls_failed`` tells the handshake's failure apart."""

    connected = False

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = socket.create_connection((host, port), timeout, self.source_address)
        self.connected = True
        try:
            return self.context.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise


def check(settings: SmtpSettings, timeout: float) -> str:
    """Connect, read the greeting, EHLO, STARTTLS (or implicit TLS), log in and QUIT, each
    step within ``timeout`` seconds; return what was proved ("office@smtp.example.edu:587
    (STARTTLS, login ok)"). Raises ``ConfigError`` (exit 2) for unusable settings and
    ``PreflightError`` (exit 3) naming host, port and the step that failed."""
    from bulkmail.errors import ConfigError, PreflightError

    problem = config_problem(settings)
    if problem is not None:
        raise ConfigError(problem)
    s = settings
    where = f"{s.host}:{s.port}"

    def failed(what: str) -> PreflightError:
        return PreflightError(f"smtp {where}: {what}")

    probe: _Probe | _ProbeTls
    try:
        context = client_context(s.ca_file) if s.security != "none" else None
    except (OSError, ssl.SSLError) as exc:  # the CA file vanished since it was checked
        raise ConfigError(f"{CA_FILE_SETTING}: {_exc_text(exc)}") from None
    if s.security == "tls":
        probe = _ProbeTls(timeout=timeout, context=context)
    else:
        probe = _Probe(timeout=timeout)
    step = "connect"
    try:
        try:
            code, reply = probe.connect(s.host, s.port)
        except ConnectionRefusedError:
            raise failed(
                "connection refused (nothing listens there: check host and port)"
            ) from None
        except socket.gaierror as exc:
            raise failed(f"host not found ({_exc_text(exc)})") from None
        except ssl.SSLError as exc:
            raise failed(f"TLS failed: {_exc_text(exc)}{_tls_hint(s, exc)}") from None
        except (TimeoutError, smtplib.SMTPServerDisconnected) as exc:
            if not _timed_out(exc):
                raise failed(
                    f"not SMTP: the server closed or garbled the greeting ({_exc_text(exc)})"
                ) from None
            if not probe.connected:
                raise failed(f"timed out connecting after {timeout:g} s") from None
            if isinstance(probe, _ProbeTls):
                raise failed(
                    f"timed out after {timeout:g} s in the TLS handshake or waiting for the "
                    "greeting: check that this port expects TLS from the start"
                ) from None
            raise failed(
                f"not SMTP: no 220 greeting within {timeout:g} s (check the port; a TLS port "
                "such as 465 needs security 'tls')"
            ) from None
        except UnicodeError as exc:
            raise failed(f"not SMTP: a garbled greeting ({_exc_text(exc)})") from None
        except OSError as exc:
            raise failed(f"cannot connect: {_exc_text(exc)}") from None
        if code != 220:
            if code == -1 or not 200 <= code <= 599:
                raise failed(f"not SMTP: no 220 greeting ({_reply_text(code, reply)})")
            raise failed(
                f"the server refuses this connection: {_reply_text(code, reply)}"
            ) from None
        step = "EHLO"
        probe.ehlo_or_helo_if_needed()
        secured = {"tls": "TLS", "starttls": "STARTTLS", "none": "no TLS"}[s.security]
        if s.security == "starttls":
            if not probe.has_extn("starttls"):
                raise failed(
                    "the server does not offer STARTTLS: set security to 'tls' if it expects "
                    "TLS from the start, or check host and port"
                ) from None
            step = "STARTTLS"
            try:
                probe.starttls(context=context)
            except ssl.SSLError as exc:
                raise failed(f"TLS failed: {_exc_text(exc)}{_tls_hint(s, exc)}") from None
            probe.ehlo_or_helo_if_needed()
        login = "no login"
        if s.username:
            step = "login"
            try:
                probe.login(s.username, s.password)
            except smtplib.SMTPAuthenticationError as exc:
                raise failed(f"login rejected for user {s.username}: {_exc_text(exc)}") from None
            except smtplib.SMTPNotSupportedError:
                raise failed(
                    "the server offers no login (AUTH) here: leave the username empty, or "
                    "use security 'starttls' or 'tls'"
                ) from None
            login = "login ok"
        step = "QUIT"
        with contextlib.suppress(smtplib.SMTPException, OSError):
            probe.quit()  # everything that matters was proved
    except PreflightError:
        probe.close()
        raise
    except (smtplib.SMTPException, OSError) as exc:
        probe.close()
        if _timed_out(exc):
            raise failed(f"no answer to {step} within {timeout:g} s") from None
        raise failed(f"{step} failed: {_exc_text(exc)}") from None
    user = f"{s.username}@" if s.username else ""
    return f"smtp {user}{where} ({secured}, {login})"


def _timed_out(exc: BaseException) -> bool:
    """A timeout, also as smtplib reports one while reading a reply (a disconnect)."""
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def _tls_hint(s: SmtpSettings, exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and not s.ca_file:
        return f"; a private CA: set {CA_FILE_SETTING}"
    return ""
