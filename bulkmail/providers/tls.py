"""What the transports share about encryption: where a credential may travel unencrypted
(loopback only, one wording for every provider), and the TLS client context with an optional
private CA (``ca_file``) added to the system's trust store rather than replacing it."""

from __future__ import annotations

import ipaddress
import ssl

__all__ = ["ca_file_problem", "client_context", "is_loopback", "plaintext_problem"]


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (a name other than localhost is not trusted:
    resolving it would not prove where the password goes)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def plaintext_problem(credential: str, host: str, fix: str) -> str | None:
    """The refusal to send ``credential`` (e.g. "the SMTP password of office") unencrypted to
    ``host``, or None when ``host`` is loopback. ``fix`` says which setting encrypts."""
    if is_loopback(host):
        return None
    return (
        f"refusing to send {credential} unencrypted to {host}: {fix} "
        "(unencrypted is allowed to loopback only: localhost, 127.0.0.1, ::1)"
    )


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """A verifying TLS client context: the system's trust store, plus the certificates in
    ``ca_file`` when one is given (a private CA), so public servers stay trusted too."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def ca_file_problem(ca_file: str, setting: str) -> str | None:
    """Why ``ca_file`` cannot be used (missing, unreadable, no certificate in it), naming the
    ``setting`` (e.g. "ca_file under [smtp] (BULKMAIL_SMTP_CA_FILE)"), or None."""
    if not ca_file:
        return None
    try:
        client_context(ca_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError):
            reason = f"no PEM certificate could be loaded: {exc.reason or exc}"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc)
        return f"{setting}: cannot use {ca_file!r} as a CA certificate file ({reason})"
    return None
