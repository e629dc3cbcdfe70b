"""PROTOCOL.md is the contract: the models and the generated schema are checked against it.

Every field table of §4 must list exactly the schema's properties, with the
same required fields and the same defaults; §12 and §13 must list exactly the
error and close codes the code uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rtchat_sdk import protocol as p

pytestmark = pytest.mark.timeout(30)

DOC = (Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text(encoding="utf-8")

# Each §4 table, by the line that introduces it, and the schema definitions it describes.
TABLES: dict[str, list[str]] = {
    "**StreamPosition**": ["StreamPosition"],
    "**ResumeInfo**": ["ResumeInfo"],
    "**HeartbeatInfo**": ["HeartbeatInfo"],
    "**Limits**": ["Limits"],
    "#### `hello`": ["HelloFrame"],
    "#### `emit`": ["EmitFrame"],
    "#### `request`": ["RequestFrame"],
    "#### `join`": ["JoinFrame"],
    "#### `leave`": ["LeaveFrame"],
    "#### `publish`": ["PublishFrame"],
    "#### `ping` / `pong`": ["PingFrame", "PongFrame"],
    "#### `welcome`": ["WelcomeFrame"],
    "#### `reply`": ["ReplyFrame"],
    "#### `error`": ["ErrorFrame"],
    "#### `message`": ["MessageFrame"],
    "#### `gap`": ["GapFrame"],
}


def _cells(line: str) -> list[str]:
    """The cells of one table row (``\\|`` inside a cell is not a separator)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table_after(intro: str, text: str = DOC) -> list[list[str]]:
    """The rows (header and rule left out) of the first table from the line ``intro`` on."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(intro))
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append(_cells(line))
        elif rows:
            break
    return rows[2:]


def _section(number: str) -> str:
    start = DOC.index(f"\n## {number}. ")
    return DOC[start : DOC.index("\n## ", start + 1)]


@pytest.mark.parametrize("intro", list(TABLES))
def test_each_field_table_matches_the_schema(intro: str) -> None:
    documented: dict[str, str] = {}
    for name, _type, presence, _meaning in _table_after(intro):
        documented[name.strip("`")] = presence
    schema = p.json_schema()["$defs"]
    for definition in TABLES[intro]:
        model = schema[definition]
        assert set(documented) == set(model["properties"]), definition
        for field, presence in documented.items():
            prop: dict[str, Any] = model["properties"][field]
            if presence == "required":
                assert field in model["required"], f"{definition}.{field}"
                continue
            match = re.fullmatch(r"default `(.*)`", presence)
            assert match, f"{definition}.{field}: {presence!r} is neither required nor a default"
            assert field not in model.get("required", []), f"{definition}.{field}"
            assert "default" in prop, f"{definition}.{field}: the schema gives no default"
            assert prop["default"] == json.loads(match.group(1)), f"{definition}.{field}"


def test_the_error_code_table_lists_every_code() -> None:
    rows = _table_after("| code | id | when |", _section("12"))
    assert [row[0].strip("`") for row in rows] == [code.value for code in p.ErrorCode]


def test_the_close_code_table_lists_every_code() -> None:
    rows = _table_after("| code | name |", _section("13"))
    assert [(int(row[0]), row[1]) for row in rows] == [(c.value, c.name) for c in p.CloseCode]
