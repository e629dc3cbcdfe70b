"""The server's layout rules, checked on its source: a sans-I/O core, small modules, no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)

SERVER = Path(__file__).resolve().parent.parent / "server_ref"
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


@pytest.mark.parametrize("path", sorted(SERVER.rglob("*.py")), ids=lambda p: p.name)
def test_every_server_module_is_at_most_600_lines_and_declares_all(path: Path) -> None:
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
                assert node.module in {"rtchat_sdk", "rtchat_sdk.errors", "rtchat_sdk.events"}, path
                assert all(not alias.name.startswith("_") for alias in node.names), path
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "p"  # rtchat_sdk.protocol as p
            ):
                assert not node.attr.startswith("_"), (path, node.attr)
