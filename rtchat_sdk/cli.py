"""``rtchat``: the command-line client.

::

    rtchat listen URL --room R [--room R2 ...] [--count N] [--no-reconnect]
    rtchat send URL --room R EVENT [JSON]
    rtchat request URL EVENT [JSON] [--timeout S]
    rtchat presence URL --room R [--stats] [--timeout S]
    rtchat history URL --room R [--limit N] [--reverse] [--timeout S]

Every subcommand also takes ``--ns /path`` (namespace, default ``/``),
``--user NAME`` (sent as the hello's auth ``{"user": NAME}``), ``--token T``
(a bearer token such as a JWT, sent as ``auth.token``; default ``$RTCHAT_TOKEN``),
``--connect-timeout S`` and ``-v`` (log the SDK's info messages on stderr).

``listen`` prints one JSON object per delivery on stdout, one a line, flushed
at once: ``{"event", "data", "room", "ns", "sender", "stream", "offset"}``.
A room's presence events (the server's ``$join`` / ``$leave`` entries, where
its namespace has presence events on) are printed among them, in stream
order, told apart by a ``presence`` key in place of ``event``:
``{"presence": "join", "session", "user", "client", "joined_at", "room",
"ns", "stream", "offset"}``, and for a leave ``"presence": "leave"`` with a
``"reason"`` after ``joined_at``. It writes ``joined ROOM`` on stderr for each
room once the server has confirmed the join, so a script can wait for that
line before it publishes. It runs until ``--count`` lines were printed
(presence events count), Ctrl-C or SIGTERM (exit 0), or the
connection is gone for good (exit 1). A dropped link is retried with the SDK's
backoff and resumed from the last offset, so nothing is missed or repeated;
what the server can no longer replay (say after a restart without its
history) is reported on stderr as a gap. Once the link is back and the rooms
are joined again, ``rtchat: reconnected`` is written on stderr.
``--no-reconnect`` exits 1 when the link drops instead.

``send`` joins the room (the server only takes publishes from members),
publishes and prints ``{"offset": N}``. ``request`` prints the handler's reply
as JSON. ``presence`` prints who is in the room, one JSON object per member
and line, oldest first: ``{"session", "user", "client", "joined_at"}``
(nothing for an empty room); with ``--stats`` one object instead,
``{"stream", "sessions", "users"}``. A namespace without presence is an error
(``not_enabled``). ``history`` prints the room's kept entries, one JSON object
per line as ``listen`` prints deliveries (presence entries too): at most
``--limit`` (1 to 10000, default 100), from the oldest kept, or newest first
from the newest with ``--reverse``; when the server keeps more than that,
``rtchat: more entries are kept beyond these N`` follows on stderr. Neither
``presence`` nor ``history`` joins the room. None of these reconnects: they
fail fast and say why.

Exit status: 0 success; 1 a connection or server error, reported on stderr as
one line ``rtchat: error: ...``; 2 bad usage (including a JSON argument that
does not parse); 130 interrupted (any command but ``listen``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel

from .aio import Client, ConnectionState
from .aio.handlers import Delivery
from .backoff import ReconnectPolicy
from .errors import AckTimeout, RTChatError
from .protocol import MAX_HISTORY_LIMIT

__all__ = ["build_parser", "main"]

PROG = "rtchat"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_NO_RECONNECT = ReconnectPolicy(enabled=False)


class CliError(Exception):
    """A failure to report as ``rtchat: error: ...`` with exit status 1."""


# ----------------------------------------------------------------------
# Argument parsing


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from None


def _ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"URL must start with ws:// or wss://, got {text!r}")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _namespace(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"namespace must start with '/', got {text!r}")
    return text


def _limit(text: str) -> int:
    value = _count(text)
    if value > MAX_HISTORY_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_HISTORY_LIMIT}, got {text!r}")
    return value


def _add_timeout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help=f"seconds to wait for {what} (default: %(default)s)",
    )


def _add_payload(parser: argparse.ArgumentParser) -> None:
    """The optional JSON payload argument of `send` and `request`."""
    parser.add_argument(
        "data",
        metavar="JSON",
        nargs="?",
        type=_json_value,
        default=None,
        help="payload as JSON (default: null)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``rtchat`` argument parser (exposed for docs and tests)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", metavar="URL", type=_ws_url, help="server URL, ws://host:port")
    common.add_argument(
        "--ns", type=_namespace, default="/", help="namespace (default: %(default)s)"
    )
    common.add_argument("--user", help='user name, sent as auth {"user": USER}')
    common.add_argument(
        "--token",
        default=os.environ.get("RTCHAT_TOKEN") or None,
        help="bearer token (e.g. a JWT), sent as auth.token (default: $RTCHAT_TOKEN)",
    )
    common.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds to wait for the connection (default: %(default)s)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log the SDK's info messages on stderr"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of an rtchat server.",
        epilog="Exit status: 0 ok, 1 connection or server error, 2 usage error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listen = sub.add_parser(
        "listen",
        parents=[common],
        help="print every delivery in rooms as JSON lines",
        description="Join rooms and print each delivery as one JSON object per line.",
    )
    listen.add_argument(
        "--room", action="append", required=True, help="room to join (repeat for several)"
    )
    listen.add_argument(
        "--count", type=_count, metavar="N", help="exit after N deliveries (default: run on)"
    )
    listen.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit 1 when the connection drops instead of reconnecting and resuming",
    )

    send = sub.add_parser(
        "send",
        parents=[common],
        help="publish one message to a room",
        description='Join a room, publish one message and print {"offset": N}.',
    )
    send.add_argument("--room", required=True, help="room to publish to")
    send.add_argument("event", metavar="EVENT", help="event name, e.g. chat.message")
    _add_payload(send)
    _add_timeout(send, "the server's acknowledgement")

    request = sub.add_parser(
        "request",
        parents=[common],
        help="call a server handler and print its reply",
        description="Send a request to a server handler and print its reply as JSON.",
    )
    request.add_argument("event", metavar="EVENT", help="event name of the server handler")
    _add_payload(request)
    _add_timeout(request, "the reply")

    presence = sub.add_parser(
        "presence",
        parents=[common],
        help="print who is in a room as JSON lines",
        description="Print the members of a room, one JSON object per line, oldest first "
        "(the server's namespace must keep presence).",
    )
    presence.add_argument("--room", required=True, help="room to look into")
    presence.add_argument(
        "--stats",
        action="store_true",
        help='print {"stream", "sessions", "users"}: how many, not who',
    )
    _add_timeout(presence, "the answer")

    history = sub.add_parser(
        "history",
        parents=[common],
        help="print a room's kept entries as JSON lines",
        description="Print the entries a room's stream keeps, one JSON object per line.",
    )
    history.add_argument("--room", required=True, help="room to read")
    history.add_argument(
        "--limit",
        type=_limit,
        default=100,
        metavar="N",
        help=f"entries, at most (1 to {MAX_HISTORY_LIMIT}; default: %(default)s)",
    )
    history.add_argument(
        "--reverse", action="store_true", help="newest first, from the newest entry"
    )
    _add_timeout(history, "the answer")
    return parser


# ----------------------------------------------------------------------
# Output


def _emit(obj: Any) -> None:
    """Write one JSON line on stdout and flush it."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


_PRESENCE = {"$join": "join", "$leave": "leave"}
_MEMBER_KEYS = ("session", "user", "client", "joined_at")


def _entry(data: Any, meta: Delivery) -> dict[str, Any]:
    """How ``listen`` and ``history`` print one entry of a stream: a delivery, or a
    presence event (``$join`` / ``$leave``) with its member's fields."""
    change = _PRESENCE.get(meta.event)
    fields = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    if change is None or not isinstance(fields, dict):
        return {
            "event": meta.event,
            "data": data,
            "room": meta.room,
            "ns": meta.ns,
            "sender": meta.sender,
            "stream": meta.stream,
            "offset": meta.offset,
        }
    keys = (*_MEMBER_KEYS, "reason") if change == "leave" else _MEMBER_KEYS
    member = {key: fields.get(key) for key in keys}
    where = {"room": meta.room, "ns": meta.ns, "stream": meta.stream, "offset": meta.offset}
    return {"presence": change, **member, **where}


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not fail again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AckTimeout):
        return f"timeout: {exc}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, always


def _client(args: argparse.Namespace, reconnect: ReconnectPolicy | None) -> Client:
    return Client(
        args.url,
        auth={"user": args.user} if args.user is not None else None,
        token=args.token,
        reconnect=reconnect,
        connect_timeout=args.connect_timeout,
        name="rtchat-cli",
    )


# ----------------------------------------------------------------------
# Commands


async def _listen(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # What the main loop below waits for: "reconnected", "done" (count reached), "closed".
    news: asyncio.Queue[str] = asyncio.Queue()
    printed = 0
    welcomed = False
    interrupted = False
    reader_gone = False

    def on_signal() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            task.cancel()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)

    client = _client(args, _NO_RECONNECT if args.no_reconnect else None)
    room = client.namespace(args.ns)

    def on_delivery(data: Any, meta: Delivery) -> None:
        nonlocal printed, reader_gone
        if reader_gone or (args.count is not None and printed >= args.count):
            return
        try:
            _emit(_entry(data, meta))
        except BrokenPipeError:
            # stdout's reader went away (``rtchat listen ... | head -3``): stop quietly.
            reader_gone = True
            _silence_stdout()
            news.put_nowait("done")
            return
        printed += 1
        if args.count is not None and printed >= args.count:
            news.put_nowait("done")

    def on_state(new: ConnectionState) -> None:
        nonlocal welcomed
        if new is ConnectionState.RECONNECTING:
            _note(f"{PROG}: connection lost, reconnecting")
        elif new is ConnectionState.CONNECTED:
            if welcomed:
                news.put_nowait("reconnected")
            welcomed = True
        elif new is ConnectionState.CLOSED:
            news.put_nowait("closed")

    room.on("*")(on_delivery)  # before joining, so that no delivery is missed
    client.on_state_change(on_state)
    try:
        await client.connect()
        for name in args.room:
            await room.join(name)
            _note(f"joined {name}")
        while (what := await news.get()) == "reconnected":
            # The client rejoins by itself if the server lost the session, ahead of
            # anything else; joining again (a no-op for a member) and waiting for the
            # reply tells when that is done, so that "reconnected" means "listening".
            try:
                for name in args.room:
                    await room.join(name)
            except RTChatError:
                continue  # closed for good: "closed" is queued next
            _note(f"{PROG}: reconnected")
    except asyncio.CancelledError:
        if not interrupted:
            raise
        task.uncancel()
        what = "interrupted"
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await client.close()
    if what in ("interrupted", "done"):
        return EXIT_OK
    reason = client.closed_reason
    raise CliError(_describe(reason) if reason is not None else "the connection closed")


async def _send(args: argparse.Namespace) -> int:
    async with _client(args, _NO_RECONNECT) as client:
        room = client.namespace(args.ns)
        async with asyncio.timeout(args.timeout):
            await room.join(args.room)
            offset = await room.publish(args.room, args.event, args.data)
    _emit({"offset": offset})
    return EXIT_OK


async def _request(args: argparse.Namespace) -> int:
    async with _client(args, _NO_RECONNECT) as client:
        room = client.namespace(args.ns)
        try:
            reply = await room.request(args.event, args.data, timeout=args.timeout)
        except AckTimeout as exc:
            raise CliError(f"timeout: no reply to {args.event!r} within {args.timeout:g}s") from exc
    _emit(reply)
    return EXIT_OK


async def _presence(args: argparse.Namespace) -> int:
    lines: list[BaseModel]
    with _answer_within(args):
        async with _client(args, _NO_RECONNECT) as client:
            room, timeout = client.namespace(args.ns), args.timeout
            if args.stats:
                lines = [await room.presence_stats(args.room, timeout=timeout)]
            else:
                lines = list(await room.presence(args.room, timeout=timeout))
    for line in lines:
        _emit(line.model_dump(mode="json"))
    return EXIT_OK


async def _history(args: argparse.Namespace) -> int:
    with _answer_within(args):
        async with _client(args, _NO_RECONNECT) as client:
            room = client.namespace(args.ns)
            page = await room.history(
                args.room, limit=args.limit, reverse=args.reverse, timeout=args.timeout
            )
    for frame in page.entries:
        _emit(_entry(frame.data, Delivery.of(frame)))
    if page.more:
        _note(f"{PROG}: more entries are kept beyond these {len(page.entries)}")
    return EXIT_OK


@contextlib.contextmanager
def _answer_within(args: argparse.Namespace) -> Iterator[None]:
    """A read's AckTimeout in the words of the command line."""
    try:
        yield
    except AckTimeout as exc:
        raise CliError(f"timeout: no answer to {args.command} within {args.timeout:g}s") from exc


_COMMANDS = {
    "listen": _listen,
    "send": _send,
    "request": _request,
    "presence": _presence,
    "history": _history,
}


async def _run(args: argparse.Namespace) -> int:
    try:
        return await _COMMANDS[args.command](args)
    except RTChatError as exc:
        raise CliError(_describe(exc)) from exc
    except TimeoutError as exc:  # asyncio.timeout() around send's join and publish
        raise CliError(
            f"timeout: no acknowledgement within {getattr(args, 'timeout', 0):g}s"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rtchat`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format=f"{PROG}: %(levelname)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        return asyncio.run(_run(args))
    except CliError as exc:
        _note(f"{PROG}: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "listen" else EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout's reader went away: nobody to tell
        _silence_stdout()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
