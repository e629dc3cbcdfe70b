"""Layering rules: the server core does no I/O, modules (client and server) stay
small, no cycle, and importing the server or the protocol loads none of the
client's driver."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server_ref"
CLIENT = ROOT / "rtchat_sdk"
IO_MODULES = {"asyncio", "websockets", "socket", "selectors", "time", "threading"}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative ones as written, e.g. '.server')."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


@pytest.mark.parametrize("path", sorted((SERVER / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_does_no_io(path: Path) -> None:
    used = {name.split(".")[0] for name in imports(path)}
    assert not used & IO_MODULES


@pytest.mark.parametrize(
    "path",
    sorted([*SERVER.rglob("*.py"), *CLIENT.rglob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_module_is_at_most_600_lines_and_declares_all(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 600
    assert "__all__" in text


def test_app_does_not_import_the_server() -> None:
    assert not {".server", "server_ref.server"} & imports(SERVER / "app.py")


def test_server_ref_uses_only_public_names_of_the_client_package() -> None:
    for path in SERVER.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rtchat_sdk"):
                shared = {"rtchat_sdk", "rtchat_sdk.errors", "rtchat_sdk.events", "rtchat_sdk.wsio"}
                assert node.module in shared, path
                assert all(not alias.name.startswith("_") for alias in node.names), path
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "p"  # rtchat_sdk.protocol as p
            ):
                assert not node.attr.startswith("_"), (path, node.attr)


def _loaded_after(statement: str) -> set[str]:
    probe = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True
    )
    return set(json.loads(done.stdout))


def test_importing_the_server_loads_no_client_driver_sqlite_tenacity_redis_jwt_or_metrics() -> None:
    loaded = _loaded_after("import server_ref")
    assert "server_ref.server" in loaded  # the probe did import the server
    unwanted = {
        name
        for name in loaded
        if name.startswith(("rtchat_sdk.aio", "rtchat_sdk.sync", "rtchat_sdk.sqlite_outbox"))
        or name.split(".")[0]
        in ("sqlite3", "tenacity", "redis", "jwt", "cryptography", "prometheus_client")
        or name.startswith(("server_ref.broker.redis", "server_ref.auth", "server_ref.metrics"))
    }
    assert unwanted == set()


def test_the_redis_broker_loads_on_first_use() -> None:
    loaded = _loaded_after("import server_ref; server_ref.RedisBroker")
    assert {"server_ref.broker.redis", "redis"} <= loaded


def test_importing_the_protocol_loads_only_the_protocol() -> None:
    loaded = _loaded_after("from rtchat_sdk import protocol")
    ours = {name for name in loaded if name.startswith("rtchat_sdk")}
    assert ours == {
        "rtchat_sdk",
        "rtchat_sdk.errors",
        "rtchat_sdk.events",
        "rtchat_sdk.protocol",
        "rtchat_sdk.protocol.codec",
        "rtchat_sdk.protocol.fastpath",
        "rtchat_sdk.protocol.frames",
        "rtchat_sdk.protocol.heartbeat",
        "rtchat_sdk.protocol.reads",
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
