"""The reference server's command line: ``rtchat-server`` / ``python -m server_ref``.

Every field of :class:`ServerConfig` is a flag (``heartbeat_interval`` is
``--heartbeat-interval``) whose default comes from the dataclass, so a new
field gets its flag without touching this module; the fields that are not
numbers (TLS, allowed origins, trusted proxies: ``OWN_FLAGS``) have flags written
here. The server answers a built-in ``echo`` request in the default namespace ``/``.

Exit codes:

* 0: stopped by SIGINT or SIGTERM after a graceful shutdown (every client got
  a ``shutting_down`` error frame and a 1001 GOING_AWAY close);
* 1: could not listen (address in use, unknown host...), or the broker's
  store (``--redis``) could not be reached within a few seconds;
* 2: bad command line;
* killed by the signal (128 + its number in a shell): a second SIGINT or
  SIGTERM during the graceful shutdown, which may otherwise wait up to the
  close timeout for clients that do not answer the closing handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, get_type_hints

from rtchat_sdk import protocol as p

from .app import Context
from .auth_flags import add_jwt_flags, jwt_authenticator
from .broker import MAX_CALLS, Broker
from .config import ServerConfig
from .errors import BrokerUnavailable
from .room_claims import guard_rooms
from .server import Authenticator, Server

__all__ = ["OWN_FLAGS", "build_parser", "config_from_args", "main"]

log = logging.getLogger("server_ref.cli")

PROG = "rtchat-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

CONFIG_HELP: dict[str, str] = {
    "heartbeat_interval": "seconds between application heartbeats",
    "heartbeat_timeout": "seconds of silence past the interval before a peer is dead",
    "handshake_timeout": "seconds a new connection has to send its hello",
    "max_frame_bytes": "largest frame accepted, in bytes",
    "max_in_flight": "unanswered messages a client may have in flight",
    "max_bad_frames": "unparseable frames tolerated before disconnecting",
    "history_size": "entries kept per stream for replay",
    "history_seconds": "seconds an entry is kept for replay",
    "session_ttl": "seconds a disconnected session stays resumable",
    "dedupe_size": "replies remembered per session to answer resent messages",
    "max_pending_bytes": "unsent bytes before a slow consumer is disconnected",
    "shutdown_retry_after": "seconds clients are told to wait before reconnecting",
    "max_connections": "connections accepted at once; past it new ones are told to retry",
    "overload_retry_after": "seconds refused clients are told to wait when overloaded",
    "max_connections_per_address": "connections at once from one client address (0: no limit)",
    "rate_per_second": "messages per second one connection may send, on average",
    "rate_burst": "messages one connection may send at once above that rate",
    "rate_abuse_limit": "messages refused in a row (rate_limited) before closing with 4009",
    "max_rooms": "rooms one session may be in; a join past it gets too_many_rooms",
    "unavailable_retry_after": "seconds clients wait to resend what the broker could not take",
    "poll_timeout": "seconds a long poll is held when there is nothing to send",
    "poll_idle_timeout": "seconds without a request before a polling connection is dropped",
    "poll_max_frames": "frames per poll answer and per POST, at most",
    "token_expiry_grace": "seconds a connection outlives its token's expiry (then 4008)",
    "presence_ttl": "seconds a presence entry lasts unless renewed (every third of it)",
    "presence_grace": "seconds a dropped session stays present, waiting for a resume",
    "compression": "accept permessage-deflate from clients that ask for it",
    "demo": "serve a small chat page at /demo/ (uses /rtchat.js, the browser client)",
    "metrics": "serve Prometheus metrics at GET /metrics on the server's port",
    "request_timing_every": "time one handler call in this many for the duration metric",
}
"""Help text per ServerConfig field; a field missing here still gets a flag."""

OWN_FLAGS = frozenset({"certfile", "keyfile", "ssl_context", "allowed_origins", "trusted_proxies"})
"""ServerConfig fields that are not numbers: flags of their own, or none (a context)."""


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _number(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses a finite int or float (range checks are ServerConfig's)."""

    def parse(text: str) -> int | float:
        value = kind(text)  # ValueError -> argparse's "invalid int/float value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {port}")
    return port


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The parser, with one flag per ServerConfig field."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [options]",
        description=(
            "Run the rtchat reference server: in-memory broker by default, or several"
            " nodes sharing one Redis (--redis)."
        ),
        epilog="SIGINT or SIGTERM shuts down gracefully (exit 0); a second one exits at once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port to listen on (0: any free port)"
    )
    hints = get_type_hints(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        if field.name in OWN_FLAGS:
            continue
        kind = hints[field.name]
        help_text = CONFIG_HELP.get(field.name, f"ServerConfig.{field.name}")
        if kind is bool:
            parser.add_argument(
                _flag(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=help_text,
            )
            continue
        if kind not in (int, float):
            raise TypeError(f"ServerConfig.{field.name}: no flag for type {kind!r}")
        parser.add_argument(
            _flag(field.name),
            dest=field.name,
            type=_number(kind),
            default=field.default,
            metavar="N" if kind is int else "SECONDS" if help_text.startswith("seconds") else "X",
            help=help_text,
        )
    _tls_and_origin_flags(parser)
    parser.add_argument(
        "--presence",
        action="store_true",
        help="keep presence in the default namespace /: clients may ask who is in a room"
        " (presence, presence_stats)",
    )
    parser.add_argument(
        "--presence-events",
        action="store_true",
        help="with presence, append $join/$leave entries to room streams (each costs a"
        " delivery to every member: leave off for large rooms)",
    )
    parser.add_argument(
        "--asgi",
        action="store_true",
        help="serve through the ASGI app under uvicorn instead of websockets' server (the"
        " same endpoints on one port; needs uvicorn; about 1.7x the memory per connection)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("REDIS_URL") or None,
        help="share streams and sessions with other nodes through this Redis"
        " (redis://HOST:PORT/DB; default: $REDIS_URL, else the in-memory broker)",
    )
    parser.add_argument(
        "--redis-prefix",
        metavar="PREFIX",
        default="rtchat",
        help="prefix of every Redis key, so several deployments can share one Redis",
    )
    parser.add_argument(
        "--redis-max-calls",
        metavar="N",
        type=_number(int),
        default=MAX_CALLS,
        help="with --redis: requests between nodes in flight per node, each way (long-polling"
        " requests forwarded to the node holding the connection); past it, 503 overloaded",
    )
    parser.add_argument(
        "--log-level", type=_log_level, default="INFO", help=f"one of {', '.join(LOG_LEVELS)}"
    )
    add_jwt_flags(parser)
    return parser


def _tls_and_origin_flags(parser: argparse.ArgumentParser) -> None:
    """The ServerConfig fields that are not numbers: their flags are written here."""
    parser.add_argument(
        "--certfile",
        metavar="PATH",
        help="PEM certificate chain: serve TLS (wss://, https://) on the port",
    )
    parser.add_argument(
        "--keyfile", metavar="PATH", help="PEM private key of --certfile, if not in it"
    )
    parser.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="a browser origin (https://app.example, or *) allowed to connect; repeatable;"
        " others get 403 (none: every origin, and no CORS headers)",
    )
    parser.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        metavar="CIDR",
        action="append",
        default=[],
        help="a proxy network (10.0.0.0/8) whose X-Forwarded-For names the client address;"
        " repeatable (none: the header is ignored)",
    )


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerConfig:
    """Build the ServerConfig; an invalid one exits 2 through ``parser.error``."""
    names = [f.name for f in dataclasses.fields(ServerConfig) if hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in names}
    values["allowed_origins"] = tuple(values.get("allowed_origins", ()))
    values["trusted_proxies"] = tuple(values.get("trusted_proxies", ()))
    try:
        config = ServerConfig(**values)
        config.server_ssl()  # a certificate that cannot be loaded is a bad command line
        return config
    except OSError as exc:  # ssl.SSLError included
        parser.error(f"--certfile/--keyfile: cannot load the certificate: {exc}")
    except (TypeError, ValueError) as exc:
        # Speak in flags, not field names: "--dedupe-size must be at least --max-in-flight".
        pattern = r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b"
        parser.error(re.sub(pattern, lambda m: _flag(m.group(1)), str(exc)))


def _echo(ctx: Context, data: Any) -> Any:
    """The built-in ``echo`` request handler: replies with its payload unchanged."""
    return data


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _broker(args: argparse.Namespace, config: ServerConfig) -> tuple[Broker | None, str]:
    """The broker the flags ask for (None: the server's in-memory default) and its name."""
    if args.redis is None:
        return None, "in-memory broker"
    from .broker.redis import RedisBroker  # redis-py only for those who use it

    broker = RedisBroker(
        args.redis,
        prefix=args.redis_prefix,
        history_size=config.history_size,
        history_seconds=config.history_seconds,
        dedupe_size=config.dedupe_size,
        dedupe_ttl=max(3_600.0, 2 * config.session_ttl),
        max_calls=args.redis_max_calls,
    )
    return broker, f"redis broker at {args.redis}, prefix {args.redis_prefix!r}"


async def _serve(
    host: str,
    port: int,
    config: ServerConfig,
    broker: Broker | None,
    broker_name: str,
    asgi: bool = False,
    authenticate: Authenticator | None = None,
    rooms_claim: str | None = None,
    presence: tuple[bool, bool] = (False, False),
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            log.info("%s received: shutting down gracefully (send again to force)", sig.name)
            stop.set()
        else:
            # Die of the signal, as with no handler: prompt, whatever is pending.
            log.warning("%s received again: exiting now", sig.name)
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # no signal handlers on this platform
            continue
        handled.append(sig)

    if asgi:
        from .asgi import uvicorn_listener  # uvicorn only for those who ask

        server = Server(
            config, broker=broker, transport=uvicorn_listener, authenticate=authenticate
        )
        broker_name += ", served by uvicorn"
    else:
        server = Server(config, broker=broker, authenticate=authenticate)
    keeps, events = presence
    server.namespace(p.DEFAULT_NAMESPACE, presence=keeps or events, presence_events=events)
    server.namespace(p.DEFAULT_NAMESPACE).on("echo")(_echo)
    if rooms_claim is not None:  # --jwt-rooms-claim: the token lists the rooms of /
        guard_rooms(server.namespace(p.DEFAULT_NAMESPACE), rooms_claim)
    try:
        try:
            await server.start(host, port)
        except BrokerUnavailable as exc:
            await server.close()
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            await server.close()
            print(
                f"{PROG}: error: cannot listen on {_display_host(host)}:{port}: {exc}",
                file=sys.stderr,
            )
            return 1
        ws, web = ("wss", "https") if config.tls else ("ws", "http")
        address = f"{_display_host(host)}:{server.port}"
        print(f"rtchat server listening on {ws}://{address} ({broker_name})", flush=True)
        if config.demo:
            print(f"demo chat page at {web}://{address}/demo/", flush=True)
        await stop.wait()
        await server.close()
        log.info("server stopped")
        return 0
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rtchat-server``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    authenticate = jwt_authenticator(parser, args)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    try:
        broker, broker_name = _broker(args, config)
    except ImportError as exc:
        parser.error(f"--redis needs redis-py: pip install 'rtchat[redis]' ({exc})")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(
            _serve(
                args.host,
                args.port,
                config,
                broker,
                broker_name,
                args.asgi,
                authenticate,
                args.jwt_rooms_claim,
                (args.presence, args.presence_events),
            )
        )
    except KeyboardInterrupt:  # SIGINT before the handlers were installed or after removal
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
