"""bench/modal_mock_suite.py against Modal's own mock server, when a modal-client checkout is given.

    RETOOL_MODAL_CLIENT_CHECKOUT=/path/to/modal-client python -m pytest -q tests/runtime/modal/test_modal_mock_suite.py

The suite drives `SdkAdapter` and `ModalStore` through the installed `modal` client against
`MockClientServicer` from that checkout's `py/test/conftest.py` (docs/modal.md, "Checked
against Modal's mock server"). It runs in its own process: it sets MODAL_* variables and the
client's process-wide state. Skipped without a checkout, or without the `modal` and
`modal-mock` extras.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SUITE = REPO / "bench" / "modal_mock_suite.py"
CHECKOUT = os.environ.get("RETOOL_MODAL_CLIENT_CHECKOUT", "")

pytestmark = [
    pytest.mark.skipif(not CHECKOUT, reason="set RETOOL_MODAL_CLIENT_CHECKOUT to a modal-labs/modal-client checkout"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("modal", "jwt", "pytest_asyncio")),
                       reason="needs the modal and modal-mock extras: pip install -e '.[modal,modal-mock]'"),
]


def test_every_case_passes_against_modals_mock_server() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(SUITE), CHECKOUT], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    sys.path.insert(0, str(SUITE.parent))
    try:
        import modal_mock_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    rows = [line for line in out.splitlines() if "  PASS  " in line]
    for name, _ in modal_mock_suite.CASES:  # every case ran and passed: none was skipped silently
        assert any(row.startswith(name + " ") for row in rows), f"{name} did not pass:\n{out}"
    assert f"{len(modal_mock_suite.CASES)} passed, 0 failed" in out, out
