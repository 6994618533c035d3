"""API tokens and their roles, for the HTTP API and the dashboard (no Flask here).

A token is 32 random bytes (URL-safe base64, prefixed ``bm_``), shown once when it is made
(``bulkmail serve token add NAME --role sender``); the store keeps only its SHA-256. A salted slow
hash is for passwords people choose: a random 256-bit token cannot be guessed from its
SHA-256, and a plain digest lets a request find its token with one indexed lookup.

Roles: ``viewer`` reads (job status, recent jobs, reports, previews); ``sender`` also
creates, cancels, resumes and retries jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from bulkmail.errors import InputError
from bulkmail.store.contract import JobStore
from bulkmail.store.records import ROLES, TokenRecord

__all__ = [
    "ROLES",
    "Identity",
    "add_token",
    "allows",
    "authenticate",
    "hash_token",
    "list_tokens",
    "new_token",
    "remove_token",
]

PREFIX = "bm_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class Identity:
    """Who a request acts as: the token's name (recorded on the jobs it creates) and role."""

    name: str
    role: str


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed``: a sender may do what a viewer may."""
    if needed not in ROLES or role not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def authenticate(store: JobStore, token: str) -> Identity | None:
    """The identity of a presented token, or None when it is unknown or revoked."""
    token = token.strip()
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    record = store.token_by_hash(digest)
    # the lookup already matched; compare again in constant time all the same
    if record is None or not hmac.compare_digest(record.token_hash, digest):
        return None
    return Identity(record.name, record.role)


def check_hash(store: JobStore, token_hash: str) -> Identity | None:
    """The identity behind a logged-in session (which keeps the token's hash): None once
    the token is removed, so removing a token ends its sessions too."""
    record = store.token_by_hash(token_hash)
    if record is None or not hmac.compare_digest(record.token_hash, token_hash):
        return None
    return Identity(record.name, record.role)


def add_token(store: JobStore, name: str, role: str, *, now: float | None = None) -> str:
    """Make a token named ``name`` with ``role``; returns the token (shown once, never
    stored)."""
    if not _NAME.fullmatch(name):
        raise InputError(
            f"token name {name!r}: use 1 to 64 letters, digits and . _ @ - "
            "(starting with a letter or digit)"
        )
    if role not in ROLES:
        raise InputError(f"--role: must be one of {', '.join(ROLES)}, got {role!r}")
    token = new_token()
    store.add_token(name, hash_token(token), role, now=time.time() if now is None else now)
    return token


def remove_token(store: JobStore, name: str) -> None:
    if not store.remove_token(name):
        raise InputError(f"no token named {name!r} (see `bulkmail serve token list`)")


def list_tokens(store: JobStore) -> list[TokenRecord]:
    return store.tokens()
