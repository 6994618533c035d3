"""The one small protocol every transport implements, and the three error classes.

The manager never looks at SMTP codes or HTTP statuses: each provider classifies its own
failures into one of these, and the manager acts on the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from bulkmail.models import Message


class ProviderError(Exception):
    """A failure to deliver one message. ``str(err)`` is the server's text, for the store."""


class TransientError(ProviderError):
    """Try this message again later: SMTP 4xx, dropped connection, timeout, HTTP 429/5xx.

    ``retry_after`` is the server's requested delay in seconds, when it gave one.
    ``outcome_unknown`` is true when the connection was lost after the message data was
    handed over: the server may have accepted it, so the retry carries the same Message-ID.
    ``unreachable`` is true when the server could not be reached at all (refused, timed out,
    DNS): nothing was tried for this recipient, so the attempt does not count against its
    retries; the job pauses after enough of these in a row.
    ``throttled`` is true when the server refused because the account sends too fast (SMTP
    421/450/451/452 with 4.7.x or rate wording, HTTP 429): the account's shared limiter
    slows down, and the delivery is retried without using up its retries.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        outcome_unknown: bool = False,
        unreachable: bool = False,
        throttled: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.outcome_unknown = outcome_unknown
        self.unreachable = unreachable
        self.throttled = throttled

    @property
    def untried(self) -> bool:
        """Nothing was tried for the message: its attempt is given back."""
        return self.unreachable or self.throttled


_RATE_WORDS = ("rate", "too many", "throttl", "limit")


def is_throttling(code: int, text: str) -> bool:
    """Whether an SMTP reply says the account sends too fast: 421/450/451/452 with the
    enhanced status 4.7.x or wording about rates and limits."""
    if code not in (421, 450, 451, 452):
        return False
    words = text.lower().split()
    if len(words) > 1 and words[1].startswith("4.7."):
        return True
    lowered = text.lower()
    return any(w in lowered for w in _RATE_WORDS)


class PermanentError(ProviderError):
    """This message will never be accepted as it is: SMTP 5xx, HTTP 4xx for this message."""


class FatalError(ProviderError):
    """Nothing can be sent with this configuration: authentication rejected, TLS or
    configuration failure. The job is aborted; remaining deliveries stay pending.

    ``local`` is true when it is this worker's own connection the server refused (e.g. a
    554 greeting to this host): with other live workers on the job, this worker leaves it
    and they go on; the last live worker's refusal still aborts the job."""

    def __init__(self, message: str, *, local: bool = False) -> None:
        super().__init__(message)
        self.local = local


class Provider(Protocol):
    """A transport. One instance is used by one thread at a time; it may keep a connection
    open between messages and must re-open it when it was dropped."""

    name: str

    def send(self, message: Message) -> str | None:
        """Deliver one message; return the provider's message id if it gives one.

        Raises TransientError, PermanentError or FatalError; never anything else for a
        delivery failure (unexpected exceptions are bugs and propagate).
        """
        ...

    def connect(self) -> None:
        """Open the connection ahead of the first message, so that its set-up (TLS, login)
        does not delay a rate-limited send past its slot. A no-op where there is nothing to
        open; raises as ``send`` does (a rejected login is FatalError)."""
        ...

    def close(self) -> None:
        """Release any connection. Safe to call more than once."""
        ...


@dataclass(frozen=True)
class RequestLimit:
    """A provider's limit on API requests (not messages), e.g. Mailtrap's 150 requests per
    10 s per token: a shared rate bucket ``key`` (never a secret) at ``rate`` requests per
    second with ``burst``, beside the job's message rate and caps."""

    key: str
    rate: float
    burst: int


BatchEntry = str | None | PermanentError | TransientError
"""One message's result in a batch: the provider's message id (or None) when it was
accepted, PermanentError when this message was refused, TransientError when its outcome is
not known (it is retried in doubt)."""


@runtime_checkable
class BatchProvider(Provider, Protocol):
    """A transport that can carry several messages, each to its own recipient, in one
    request (Mailtrap's ``/api/batch``). The manager uses ``send_batch`` only when
    ``batch_size`` is over 1; every request, batch or single, first takes a slot of
    ``request_limit`` when it is set."""

    @property
    def batch_size(self) -> int:
        """The most messages the manager hands to one ``send_batch``."""
        ...

    @property
    def request_limit(self) -> RequestLimit | None:
        """The API's request rate, shared by every worker with the same credentials."""
        ...

    def send_batch(self, messages: Sequence[Message]) -> list[BatchEntry]:
        """Deliver ``messages`` in ONE request; return one entry per message carried, in
        order. It may carry only a first part of them (the rest would make the request too
        large): the messages past the returned entries were not tried.

        Raises for the whole request, as ``send`` does: TransientError (a timeout or 5xx:
        every message in doubt), PermanentError (the request itself was refused) or
        FatalError (nothing can be sent: the job stops, its deliveries left pending).
        """
        ...
