"""What importing each package loads: the server never pulls in the client's driver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(30)


def _loaded_after(statement: str) -> set[str]:
    probe = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True
    )
    return set(json.loads(done.stdout))


def test_importing_the_server_loads_no_client_driver_sqlite_or_tenacity() -> None:
    loaded = _loaded_after("import server_ref")
    assert "server_ref.server" in loaded  # the probe did import the server
    unwanted = {
        name
        for name in loaded
        if name.startswith(("rtchat_sdk.aio", "rtchat_sdk.sync", "rtchat_sdk.sqlite_outbox"))
        or name.split(".")[0] in ("sqlite3", "tenacity")
    }
    assert unwanted == set()


def test_importing_the_protocol_loads_only_the_protocol() -> None:
    loaded = _loaded_after("from rtchat_sdk import protocol")
    ours = {name for name in loaded if name.startswith("rtchat_sdk")}
    assert ours == {
        "rtchat_sdk",
        "rtchat_sdk.errors",
        "rtchat_sdk.events",
        "rtchat_sdk.protocol",
        "rtchat_sdk.protocol.codec",
        "rtchat_sdk.protocol.frames",
    }


def test_the_public_names_still_load_on_first_use() -> None:
    loaded = _loaded_after("from rtchat_sdk import Client, SqliteOutbox, SyncClient")
    assert {
        "rtchat_sdk.aio.client",
        "rtchat_sdk.aio.connection",
        "rtchat_sdk.sqlite_outbox",
        "rtchat_sdk.sync",
    } <= loaded
    import rtchat_sdk

    for name in rtchat_sdk.__all__:
        assert getattr(rtchat_sdk, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        rtchat_sdk.Nope  # noqa: B018
