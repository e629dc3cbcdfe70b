"""The JSON Schema of the wire frames, generated from ``protocol``'s models.

``docs/protocol.schema.json`` is this module's output, committed so that
implementers in other languages can read it without running Python.
``PROTOCOL.md`` is the contract; the schema is derived from the models, and
tests fail when the committed file drifts from the models
(tests/test_schema.py) or the models from the document's field tables
(tests/test_protocol_doc.py).

::

    python -m rtchat_sdk.schema            # print the schema
    python -m rtchat_sdk.schema --write    # (re)write docs/protocol.schema.json
    python -m rtchat_sdk.schema --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import protocol

__all__ = ["SCHEMA_PATH", "check_schema", "main", "schema_text", "write_schema"]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.schema.json"
"""Where the generated schema is committed: ``docs/protocol.schema.json`` in the repo."""

REGENERATE_HINT = "run `python -m rtchat_sdk.schema --write` and commit the result"


def schema_text() -> str:
    """The schema as stable, pretty-printed JSON text (sorted keys, final newline)."""
    return json.dumps(protocol.json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the freshly generated schema to ``path``; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text(), encoding="utf-8", newline="\n")
    return path


def check_schema(path: Path = SCHEMA_PATH) -> str | None:
    """None when ``path`` holds exactly the generated schema; else why not."""
    try:
        committed = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path} does not exist; {REGENERATE_HINT}"
    if committed != schema_text():
        return f"{path} is out of date with rtchat_sdk/protocol.py; {REGENERATE_HINT}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Command line: print, ``--write`` or ``--check`` the schema; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m rtchat_sdk.schema",
        description="Print, write or check the JSON Schema of the rtchat wire frames.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write", action="store_true", help="write the schema to the file (default path below)"
    )
    action.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if the file differs from the generated schema",
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=SCHEMA_PATH,
        help="schema file for --write/--check (default: docs/protocol.schema.json)",
    )
    args = parser.parse_args(argv)
    if args.write:
        written = write_schema(args.path)
        print(f"wrote {written}")
        return 0
    if args.check:
        problem = check_schema(args.path)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
