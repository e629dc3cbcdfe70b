"""When to reconnect: exponential backoff with full jitter, and what is never retried.

The waits come from tenacity's ``wait_random_exponential`` (uniform between 0
and ``min(max_delay, initial_delay * multiplier ** (attempt - 1))``), so 200
clients that lose a server at once spread their attempts instead of
arriving together. ``classify`` decides whether a failure is worth retrying.

What is fatal is decided here and only here, as pure functions of what the
server said: ``refusal_error`` for an ``error`` frame refusing the handshake,
``close_error`` for how a connection was closed. The core and the driver ask
them; a ``FatalConnectionError`` they return ends the client, anything else
is retried by the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tenacity import RetryCallState, wait_random_exponential

from .errors import (
    FatalConnectionError,
    IncompatibleProtocol,
    SessionReplaced,
    Unauthorized,
)
from .protocol import CloseCode, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["ReconnectPolicy", "close_error", "is_retryable", "reconnect_at_once", "refusal_error"]

_FATAL_REFUSALS: dict[str, type[FatalConnectionError]] = {
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.UNSUPPORTED_PROTOCOL: IncompatibleProtocol,
}
_FATAL_CLOSES: dict[int, type[FatalConnectionError]] = {
    CloseCode.UNAUTHORIZED: Unauthorized,
    CloseCode.UNSUPPORTED_PROTOCOL: IncompatibleProtocol,
    CloseCode.SESSION_REPLACED: SessionReplaced,
}


def refusal_error(code: str, message: str) -> FatalConnectionError | None:
    """The error for a handshake refusal no retry can fix (bad credentials,
    an unsupported version); None for one worth retrying (e.g. ``overloaded``)."""
    cls = _FATAL_REFUSALS.get(code)
    return None if cls is None else cls(code, message)


def close_error(
    received: int | None, reason: str, *, sent: int | None, max_frame_bytes: int
) -> FatalConnectionError | None:
    """The error for a close no retry can fix, from the codes received and sent.

    We closed with 1009 (a frame over our own ``max_frame_bytes``): resuming
    would replay that frame forever. The server closed with 4001, 4002 or
    4006: it refused us for good, or another connection took the session.
    """
    if sent == CloseCode.MESSAGE_TOO_BIG:
        return FatalConnectionError(
            "message_too_big",
            f"the server sent a frame over max_frame_bytes={max_frame_bytes}; "
            "use at least the server's limit",
        )
    cls = _FATAL_CLOSES.get(received) if received is not None else None
    return None if cls is None else cls("refused", reason or f"closed with code {received}")


def reconnect_at_once(received: int | None) -> bool:
    """A close to answer with a new connection at once, without a backoff wait:
    4008, the credentials expired (the next hello carries fresh ones)."""
    return received == CloseCode.TOKEN_EXPIRED


def is_retryable(exc: BaseException) -> bool:
    """Fatal refusals (bad credentials, incompatible protocol) are never retried."""
    return not isinstance(exc, FatalConnectionError)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a client retries: delays, limits, and when the backoff resets."""

    initial_delay: float = 0.5
    """Upper bound of the first wait, in seconds."""
    max_delay: float = 30.0
    """Cap on the upper bound of any wait."""
    multiplier: float = 2.0
    """Growth of the upper bound per failed attempt."""
    max_attempts: int | None = None
    """Give up after this many failed attempts in a row (None: never)."""
    max_elapsed: float | None = None
    """Give up after failing for this long, in seconds (None: never)."""
    stable_after: float = 10.0
    """A connection up this long resets the backoff to its first step."""
    enabled: bool = True
    """False: a lost connection closes the client instead of reconnecting."""
    classify: Callable[[BaseException], bool] = is_retryable
    """Pure function: is this failure worth another attempt?"""

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delays(self) -> Iterator[float]:
        """Endless waits for attempts 1, 2, 3...; each uniformly jittered."""
        wait = wait_random_exponential(
            multiplier=self.initial_delay, max=self.max_delay, exp_base=self.multiplier
        )
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        attempt = 0
        while True:
            attempt += 1
            state.attempt_number = attempt
            yield float(wait(state))
