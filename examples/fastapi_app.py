"""A FastAPI app with rtchat mounted beside its REST routes.

    .venv/bin/python examples/fastapi_app.py [--port 8000]

Clients connect to ``ws://127.0.0.1:8000/rt/`` (health at ``/rt/healthz``);
``POST /announce {"room": "lobby", "text": "hi"}`` publishes an
``announcement`` event into the room from the REST side, and answers with
the message's offset. rtchat's server opens with the app's lifespan and
closes with it. Needs ``pip install fastapi uvicorn``.
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI
from pydantic import BaseModel

from server_ref import Server
from server_ref.asgi import create_app

rtchat_server = Server()
rtchat = create_app(rtchat_server)
app = FastAPI(title="chat with a REST side", lifespan=rtchat.lifespan)
app.mount("/rt", rtchat)


class Announcement(BaseModel):
    room: str
    text: str


@app.post("/announce")
async def announce(announcement: Announcement) -> dict[str, int]:
    """Publish into a room from a REST call: every member gets it, in order."""
    offset = await rtchat_server.publish(
        announcement.room, "announcement", {"text": announcement.text}
    )
    return {"offset": offset}


@app.get("/sessions")
async def sessions() -> dict[str, int]:
    """How many sessions this node holds (a REST route reading rtchat's state)."""
    return {"sessions": len(rtchat_server.session_ids())}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
