"""An echo bot: joins a room and answers every ``chat.message`` with an echo.

Run a server, start the bot, then talk to it::

    python3 dev.py serve                       # terminal 1: the reference server
    python examples/echo_bot.py --count 3      # terminal 2: the bot
    rtchat listen ws://127.0.0.1:8765 --room lobby          # terminal 3: see the echoes
    rtchat send ws://127.0.0.1:8765 --room lobby chat.message '{"text": "hi"}'

The bot prints ``joined lobby`` once it is in the room, then one line per
echo. It stops after ``--count`` echoes or ``--duration`` seconds, whichever
comes first. Echoes are ``chat.echo`` events, not ``chat.message``, so two
bots in one room do not answer each other forever.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from rtchat_sdk import Client, Delivery, Event, RTChatError


class ChatMessage(Event, name="chat.message"):
    text: str


class ChatEcho(Event, name="chat.echo"):
    text: str
    to: str | None = None
    """Session id of the sender of the message echoed."""


async def run(url: str, room: str, count: int, duration: float) -> int:
    echoed = 0
    done = asyncio.Event()
    async with Client(url, auth={"user": "echo-bot"}) as client:

        @client.on(ChatMessage)
        async def on_message(message: ChatMessage, meta: Delivery) -> None:
            nonlocal echoed
            if done.is_set() or meta.room != room:
                return
            offset = await client.publish(
                room, ChatEcho(text=f"echo: {message.text}", to=meta.sender)
            )
            echoed += 1
            print(f"echoed {message.text!r} from {meta.sender} (offset {offset})", flush=True)
            if echoed >= count:
                done.set()

        await client.join(room)
        print(f"joined {room}: answering chat.message with chat.echo", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
    print(f"echo bot done: {echoed} echo(es)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server URL")
    parser.add_argument("--room", default="lobby", help="room to serve (default: lobby)")
    parser.add_argument("--count", type=int, default=5, help="stop after this many echoes")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="stop after this many seconds anyway"
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.url, args.room, args.count, args.duration))
    except RTChatError as exc:
        print(f"echo bot: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
