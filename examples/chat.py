"""Two users chatting: two clients in one process, in one room.

Alice and Bob each join the room, publish ``--messages`` messages, and print
what the other one says. A sender does not get its own messages back, so each
one hears exactly the other's, in order. Run it against a server::

    python3 dev.py serve                        # terminal 1: the reference server
    python examples/chat.py --messages 3        # terminal 2

It exits 0 once both have heard every message of the other, 1 if that takes
longer than ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from rtchat_sdk import Client, Delivery, Event, RTChatError


def say(*args: object, file: TextIO | None = None) -> None:
    """print(), flushed at once so that a pipe sees each line as it happens."""
    print(*args, file=file, flush=True)


class ChatMessage(Event, name="chat.message"):
    author: str
    text: str


class Chatter:
    """One user: a client, what it heard, and an event set when it heard enough."""

    def __init__(self, url: str, name: str, expected: int) -> None:
        self.name = name
        self.client = Client(url, auth={"user": name})
        self.heard: list[str] = []
        self.expected = expected
        self.done = asyncio.Event()
        if expected == 0:
            self.done.set()
        self.client.on(ChatMessage)(self.on_message)

    def on_message(self, message: ChatMessage, meta: Delivery) -> None:
        say(f"{self.name} heard {message.author}: {message.text!r} (offset {meta.offset})")
        self.heard.append(message.text)
        if len(self.heard) >= self.expected:
            self.done.set()

    async def talk(self, room: str, count: int) -> None:
        for i in range(1, count + 1):
            text = f"message {i} from {self.name}"
            offset = await self.client.publish(room, ChatMessage(author=self.name, text=text))
            say(f"{self.name} said {text!r} (offset {offset})")


async def run(url: str, room: str, messages: int, timeout: float) -> int:
    alice = Chatter(url, "alice", messages)
    bob = Chatter(url, "bob", messages)
    async with alice.client, bob.client:
        await alice.client.join(room)
        await bob.client.join(room)
        say(f"alice and bob joined {room}")
        await asyncio.gather(alice.talk(room, messages), bob.talk(room, messages))
        try:
            async with asyncio.timeout(timeout):
                await alice.done.wait()
                await bob.done.wait()
        except TimeoutError:
            say(
                f"timed out: alice heard {len(alice.heard)}, bob heard {len(bob.heard)}"
                f" of {messages}",
                file=sys.stderr,
            )
            return 1
    say(f"done: alice heard {len(alice.heard)} and bob heard {len(bob.heard)} message(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Two clients chatting in one room.")
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server URL")
    parser.add_argument("--room", default="chat-demo", help="room (default: chat-demo)")
    parser.add_argument("--messages", type=int, default=3, help="messages per user")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait at most")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.url, args.room, args.messages, args.timeout))
    except RTChatError as exc:
        say(f"chat: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
