"""Transports behind one protocol, described by one ``ProviderSpec`` each
(:mod:`bulkmail.providers.registry`). Transport modules are imported lazily: `requests` is
only paid for by a job that sends through Mailtrap."""

from __future__ import annotations

from bulkmail.providers.base import (
    FatalError,
    PermanentError,
    Provider,
    ProviderError,
    TransientError,
)
from bulkmail.providers.registry import (
    PROVIDERS,
    SPECS,
    ProviderSpec,
    account_key,
    check_provider,
    describe,
    make_provider,
    preflight,
    with_defaults,
)

__all__ = [
    "PROVIDERS",
    "SPECS",
    "FatalError",
    "PermanentError",
    "Provider",
    "ProviderError",
    "ProviderSpec",
    "TransientError",
    "account_key",
    "check_provider",
    "describe",
    "make_provider",
    "preflight",
    "with_defaults",
]
