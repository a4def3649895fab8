"""docs/modal.md's call-state table says what `call_outcome` does with each exception.

Run against Modal's own mock server (bench/modal_mock_suite.py), the adapter and the fake
agreed with the client while that table did not (it said a TERMINATED call is `cancelled`):
this keeps every row equal to the code.
"""

from __future__ import annotations

import builtins
import re
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import RetoolError
from runtime.modal import adapter

DOC = Path(__file__).resolve().parents[3] / "docs" / "modal.md"
exc_mod: Any = pytest.importorskip("modal.exception")


def table_rows() -> list[tuple[str, str]]:
    """(the `get(timeout=0)` column, the adapter-state column) of each row."""
    section = DOC.read_text(encoding="utf-8").split("\n## Calls and their states\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]  # rows[0]: the header
    return [(c[0], c[-1]) for c in cells]


def exceptions_named(cell: str) -> list[BaseException]:
    """The exceptions a row's first column names, outside parentheses (the function's own
    exception: any other)."""
    if "function's own exception" in cell:
        return [ValueError("CUDA out of memory")]
    found = []
    for name in re.findall(r"`(\w+)`", cell.split("(")[0]):
        kind = getattr(exc_mod, name, None) if "built-in" not in cell else getattr(builtins, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind("from the docs table"))
    return found


def outcome(error: BaseException) -> str:
    """The state `call_outcome` gives, or the name of the retool error it raises."""
    try:
        return adapter.call_outcome(exc_mod, error, "fc-doc").state
    except RetoolError as raised:
        return type(raised).__name__


def test_every_row_of_the_call_state_table_is_what_call_outcome_does() -> None:
    rows = table_rows()
    assert len(rows) >= 9, rows
    checked = 0
    for first, last in rows:
        if first.startswith("returns a value"):
            continue
        errors = exceptions_named(first)
        assert errors, f"no exception named in the row {first!r}"
        want = re.findall(r"`(\w+)`", last)[0]
        for error in errors:
            assert outcome(error) == want, f"{first!r}: call_outcome gives {outcome(error)}, the table says {want}"
            checked += 1
    assert checked >= 9
