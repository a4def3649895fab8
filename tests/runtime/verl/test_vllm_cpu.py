"""runtime.verl.vllm_cpu's two hooks, on stand-ins (vLLM itself: test_vllm_cpu_e2e.py)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime.verl.vllm_cpu import SYNC_TIMEOUT_EXIT, PatchAfterImport, VllmCpuAlias, keep_weight


def test_the_alias_answers_only_its_name_and_only_when_that_name_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alias = VllmCpuAlias(alias="retool-test-absent", target="pydantic")
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, alias])
    # with the local label vLLM's platform detection reads (`+cpu`)
    assert importlib.metadata.version("retool-test-absent") == importlib.metadata.version("pydantic") + "+cpu"
    assert importlib.metadata.version("retool_test_absent") == importlib.metadata.version("pydantic") + "+cpu"
    assert importlib.metadata.distribution("retool-test-absent").metadata["Name"].lower() == "pydantic"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("retool-test-other")
    # a distribution installed under the name itself wins, and the alias adds nothing
    real = VllmCpuAlias(alias="pyyaml", target="pydantic")
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, real])
    assert [d.metadata["Name"].lower() for d in importlib.metadata.distributions(name="pyyaml")] == ["pyyaml"]
    # a missing target gives nothing, not an error
    gone = VllmCpuAlias(alias="retool-test-gone", target="retool-test-missing-target")
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, gone])
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("retool-test-gone")


def test_keep_weight_never_lets_the_dispatch_remove_the_weight() -> None:
    calls: list[tuple[Any, bool]] = []

    def dispatch(layer: Any, remove_weight: bool) -> None:
        calls.append((layer, remove_weight))

    wrapped = keep_weight(dispatch)
    wrapped("a", True)
    wrapped("b", remove_weight=True)
    wrapped("c", False)
    assert calls == [("a", False), ("b", False), ("c", False)]
    assert keep_weight(wrapped) is wrapped and wrapped.__name__ == "dispatch"


def test_the_dispatch_is_replaced_when_its_module_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "retool_fake_gemm.py").write_text(
        "def dispatch_cpu_unquantized_gemm(layer, remove_weight):\n    return remove_weight\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from runtime.verl import vllm_cpu

    hook = PatchAfterImport("retool_fake_gemm", vllm_cpu._patch_gemm)
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "retool_fake_gemm", raising=False)
    module = importlib.import_module("retool_fake_gemm")
    assert module.dispatch_cpu_unquantized_gemm(object(), True) is False
    sys.modules.pop("retool_fake_gemm", None)


def test_a_weight_sync_that_hangs_ends_its_process(tmp_path: Path) -> None:
    """The watchdog ends a process whose sync blocks (a blocking call, as the real hang's socket
    receive: no task cancellation reaches it), with its own exit status and a reason."""
    import subprocess

    script = (
        "import asyncio, time\n"
        "from runtime.verl.vllm_cpu import with_deadline\n"
        "async def sync(block):\n"
        "    time.sleep(block)\n"
        "    return 'synced'\n"
        "guarded = with_deadline(sync, 'the test sync')\n"
        "print(asyncio.run(guarded(0.0)), flush=True)\n"
        "asyncio.run(guarded(60.0))\n"
        "print('not reached', flush=True)\n"
    )
    env = {**os.environ, "RETOOL_WEIGHT_SYNC_TIMEOUT_S": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == SYNC_TIMEOUT_EXIT, done.stderr
    assert done.stdout.splitlines() == ["synced"]
    assert "the test sync did not finish within 1 s" in done.stderr
