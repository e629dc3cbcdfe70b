"""The reconnect policy's pure parts: the waits, and what is never retried."""

from __future__ import annotations

import pytest

from rtchat_sdk import (
    FatalConnectionError,
    IncompatibleProtocol,
    ReconnectPolicy,
    SessionReplaced,
    Unauthorized,
)
from rtchat_sdk import protocol as p
from rtchat_sdk.backoff import close_error, is_retryable, refusal_error


def test_waits_are_jittered_under_a_growing_capped_bound() -> None:
    delays = ReconnectPolicy(initial_delay=0.5, multiplier=2.0, max_delay=4.0).delays()
    bounds = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for bound in bounds:
        assert 0.0 <= next(delays) <= bound


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (p.ErrorCode.UNAUTHORIZED, Unauthorized),
        (p.ErrorCode.UNSUPPORTED_PROTOCOL, IncompatibleProtocol),
        (p.ErrorCode.OVERLOADED, None),
        (p.ErrorCode.SHUTTING_DOWN, None),
    ],
)
def test_only_refusals_no_retry_can_fix_are_fatal(
    code: str, expected: type[FatalConnectionError] | None
) -> None:
    error = refusal_error(code, "why")
    if expected is None:
        assert error is None
    else:
        assert type(error) is expected
        assert error.code == code
        assert not is_retryable(error)


@pytest.mark.parametrize(
    ("received", "sent", "expected"),
    [
        (p.CloseCode.UNAUTHORIZED, None, Unauthorized),
        (p.CloseCode.UNSUPPORTED_PROTOCOL, None, IncompatibleProtocol),
        (p.CloseCode.SESSION_REPLACED, None, SessionReplaced),
        (None, p.CloseCode.MESSAGE_TOO_BIG, FatalConnectionError),
        (p.CloseCode.GOING_AWAY, None, None),
        (p.CloseCode.SLOW_CONSUMER, None, None),
        (p.CloseCode.HEARTBEAT_TIMEOUT, None, None),
        (None, None, None),
    ],
)
def test_only_closes_no_retry_can_fix_are_fatal(
    received: int | None, sent: int | None, expected: type[FatalConnectionError] | None
) -> None:
    error = close_error(received, "", sent=sent, max_frame_bytes=1000)
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    assert not is_retryable(error)
    if sent == p.CloseCode.MESSAGE_TOO_BIG:
        assert error.code == "message_too_big"
        assert "max_frame_bytes=1000" in error.message
    else:
        assert error.message == f"closed with code {received}"
