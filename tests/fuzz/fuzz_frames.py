"""atheris (libFuzzer) harness: raw bytes into the frame decoder and the server hub.

Run it directly, bounded: ``python tests/fuzz/fuzz_frames.py -runs=100000``
(any libFuzzer flag works; without ``-runs`` it runs until it finds a crash).
``tests/test_fuzz.py`` runs it for a few thousand iterations when atheris is
installed. Each input is split on newlines into frames sent on one connection
of a real ``Hub`` (``tests/hubnet.py``, memory broker, fake clock), after a
``hello`` when the input's first byte is odd; a second, well-behaved
connection must still get its echo request answered. Any exception that
escapes, or a wrong answer, is a crash for libFuzzer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pydantic import ValidationError  # imported first: not instrumented (slow, not ours)

with atheris.instrument_imports(include=["rtchat_sdk", "server_ref"]):
    from rtchat_sdk import protocol as p
    from server_ref.config import ServerConfig
    from server_ref.core.connection import classify_decode_error

from tests.hubnet import HubNet

PARSE_ERRORS = {"bad_json", "bad_frame", "unknown_type", "invalid_frame"}
CLOSES = {1008, 4002, 4007}


def check_decoder(data: bytes) -> None:
    try:
        p.decode_client_frame(data)
    except ValidationError as exc:
        code, _, _ = classify_decode_error(data, exc)
        assert code in PARSE_ERRORS, code


def check_hub(data: bytes) -> None:
    net = HubNet(ServerConfig(max_bad_frames=20))
    net.namespaces["/"].on("echo")(lambda ctx, payload: payload)
    good, _ = net.hello()
    hostile = net.open()
    if data[:1] and data[0] & 1:
        net.send(hostile, {"type": "hello", "protocol": 1})
    for chunk in data[1:].split(b"\n")[:50]:
        net.hub.text_received(hostile, chunk, net.now)
        net.run()
    for text in net.sent.pop(hostile, []):
        frame = json.loads(text)
        if frame["type"] == "error":
            assert frame["code"] != "internal", frame
    if hostile in net.closed:
        assert net.closed[hostile] in CLOSES, net.closed[hostile]
    net.send(good, {"type": "request", "id": 1, "event": "echo", "data": "ok"})
    assert net.frames(good) == [{"type": "reply", "id": 1, "data": "ok"}]


def test_one_input(data: bytes) -> None:
    check_decoder(data)
    check_hub(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
