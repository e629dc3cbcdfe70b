"""A chat room page: the last messages, who is here, then live — nothing missed or twice.

This example starts its own ``Server`` with presence and join/leave events
on, has ``ann`` talk in the room, then opens the "page" as ``bob``: it reads
the room's newest messages with ``history`` (newest first, shown oldest
first), joins from the position that answer gave (so what ``ann`` says in
between still arrives, once), lists who is present, and prints the
``$join`` / ``$leave`` events of ``cat`` coming and going::

    python examples/room_page.py              # on a free port
    python examples/room_page.py --port 8766  # on a given port

It needs no other server, and exits 0 once the page saw every message once.
"""

from __future__ import annotations

import argparse
import asyncio

from rtchat_sdk import Client, Delivery, MemberJoined, MemberLeft
from server_ref import Server

ROOM = "lobby"


def say(*args: object) -> None:
    print(*args, flush=True)


async def run(port: int, last: int) -> int:
    server = Server()
    server.namespace("/", presence=True, presence_events=True)
    await server.start("127.0.0.1", port)
    say(f"server listening on {server.url}")
    try:
        async with (
            Client(server.url, auth={"user": "ann"}) as ann,
            Client(server.url, auth={"user": "bob"}) as bob,
        ):
            await ann.join(ROOM)
            for n in range(1, 11):
                await ann.publish(ROOM, "chat.message", {"text": f"message {n}"})

            heard: list[str] = []
            everything = asyncio.Event()

            @bob.on("chat.message")
            def on_message(data: dict[str, str], meta: Delivery) -> None:
                heard.append(data["text"])
                say(f"live   #{meta.offset}: {data['text']}")
                if data["text"] == "message 12":
                    everything.set()

            @bob.on_join
            def on_join(member: MemberJoined, meta: Delivery) -> None:
                say(f"{member.user} joined {meta.room}")

            left = asyncio.Event()

            @bob.on_leave
            def on_leave(member: MemberLeft, meta: Delivery) -> None:
                say(f"{member.user} left {meta.room} ({member.reason})")
                left.set()

            page = await bob.history(ROOM, limit=last, reverse=True)
            shown = [entry for entry in reversed(page.entries) if entry.event == "chat.message"]
            for entry in shown:
                say(f"before #{entry.offset}: {entry.data['text']}")
            await ann.publish(ROOM, "chat.message", {"text": "message 11"})  # between the two
            await bob.join(ROOM, since=page.position)
            members = await bob.presence(ROOM)
            say("present:", ", ".join(m.user or m.session for m in members))

            async with Client(server.url, auth={"user": "cat"}) as cat:
                await cat.join(ROOM)
                await cat.leave(ROOM)
            await ann.publish(ROOM, "chat.message", {"text": "message 12"})
            await asyncio.wait_for(everything.wait(), 10)
            await asyncio.wait_for(left.wait(), 10)
            texts = [e.data["text"] for e in shown] + heard
            if len(texts) != len(set(texts)):
                say("a message came twice")
                return 1
            say(f"room page done: {len(shown)} from history, {len(heard)} live, none twice")
            return 0
    finally:
        await server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to serve on (0: a free one)")
    parser.add_argument("--last", type=int, default=5, help="messages the page shows first")
    args = parser.parse_args()
    return asyncio.run(run(args.port, args.last))


if __name__ == "__main__":
    raise SystemExit(main())
