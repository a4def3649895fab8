"""`retool doctor SPEC` (reconciler/cli/doctor.py, runtime/modal/doctor.py) and the Modal
checks `retool validate` runs: the real CLI in a subprocess without credentials, and the
readiness rows against the fake workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.backends import set_runtime_override
from reconciler.cli.doctor import doctor_rows
from reconciler.cli.main import app
from reconciler.errors import TerminalError
from reconciler.loader import load_spec
from reconciler.state.base import LockInfo
from reconciler.state.modal_store import ModalStore
from runtime.modal.backend import ModalRuntime
from tests.fakes.fake_modal import FakeModal

REPO = Path(__file__).resolve().parents[3]
QWEN = REPO / "specs" / "retool-qwen7b.yaml"
SECRETS = {"wandb": {"WANDB_API_KEY": "w"}, "huggingface": {"HF_TOKEN": "h"}}


def no_token_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(home), MODAL_CONFIG_PATH=str(home / "absent.toml"), RETOOL_TEST_RUNTIME="")
    return env


PROBE = (
    "import sys\n"
    "from reconciler.cli.main import main\n"
    "sys.argv = ['retool', 'doctor', sys.argv[1]]\n"
    "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
    "print('modal imported:', 'modal' in sys.modules, 'grpclib imported:', 'grpclib' in sys.modules)\n"
    "sys.exit(code)\n"
)


def test_doctor_without_a_token_says_so_at_once(tmp_path: Path) -> None:
    """The issue's bound (an answer in under 5 s without a token) holds by construction: no
    token means no `import modal` and no network call. The wall time is measured, not asserted
    (docs/running-on-modal.md: `retool doctor` without credentials)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(QWEN)], cwd=REPO,
                          env=no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, text
    assert "Modal token to fix No Modal credentials" in text and "modal token new" in text
    assert "connection skipped needs a Modal token" in text and "1 to fix" in text
    assert "modal imported: False grpclib imported: False" in text


@pytest.fixture()
def workspace(tmp_path: Path) -> Iterator[FakeModal]:
    fake = FakeModal(secrets={k: dict(v) for k, v in SECRETS.items()}, rates={"H100": 3.95})
    set_runtime_override(lambda spec, state_dir: ModalRuntime(state_dir, adapter=fake))
    yield fake
    set_runtime_override(None)


def rows_by_check(tmp_path: Path, **kw: bool) -> dict[str, object]:
    return {r.check: r for r in doctor_rows(load_spec(QWEN), tmp_path / ".retool", **kw)}


def test_a_ready_workspace_is_all_ready(workspace: FakeModal, tmp_path: Path) -> None:
    rows = rows_by_check(tmp_path)
    statuses = {name: r.status for name, r in rows.items()}  # type: ignore[attr-defined]
    assert statuses == {
        "Modal token": "ready", "spec": "ready", "GPU H100:8": "ready", "GPU H100:4": "ready", "connection": "ready",
        "secret huggingface": "ready", "secret wandb": "ready", "GPU prices": "ready", "image": "ready",
        "volume retool-qwen7b-checkpoints": "ready", "volume retool-qwen7b-data": "ready",
        "volume retool-qwen7b-models": "ready", "state store": "ready", "state lock": "ready",
    }
    assert "retool apply` creates it" in rows["volume retool-qwen7b-data"].detail  # type: ignore[attr-defined]
    (built,) = workspace.images_built  # eagerly, with no function run, in the spec's environment
    assert workspace.ops_named("build_image_now") == [("build_image_now", load_spec(QWEN).spec.modal.environment or "")]
    assert built[0].args == ["verlai/verl:vllm024.dev2"] and workspace.calls == {} and workspace.deployed == {}
    # the lock was taken and released: nothing is left held
    assert ModalStore.from_spec(load_spec(QWEN).spec, adapter=workspace).lock_info() is None


def test_doctor_names_what_to_fix(workspace: FakeModal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    del workspace.secrets["wandb"]
    workspace.secrets["huggingface"] = {"HUGGINGFACE_TOKEN": "h"}  # the wrong key

    def failed_build(steps: object, env: str | None = None) -> str:
        raise TerminalError("Image build failed: pip exited with 1", hint="see the build log")

    monkeypatch.setattr(workspace, "build_image_now", failed_build)
    ModalStore.from_spec(load_spec(QWEN).spec, adapter=workspace).lock(LockInfo(command="retool apply", who="ci@runner"))
    rows = rows_by_check(tmp_path)
    wandb, hf = rows["secret wandb"], rows["secret huggingface"]
    assert wandb.status == "to fix" and wandb.fix == "modal secret create wandb WANDB_API_KEY=..."  # type: ignore[attr-defined]
    assert hf.status == "to fix" and "missing keys HF_TOKEN" in hf.detail  # type: ignore[attr-defined]
    assert rows["image"].status == "to fix" and "pip exited with 1" in rows["image"].detail  # type: ignore[attr-defined]
    lock = rows["state lock"]
    assert lock.status == "note" and "ci@runner" in lock.detail  # type: ignore[attr-defined]


def test_an_unreachable_workspace_stops_after_the_connection_row(workspace: FakeModal, tmp_path: Path) -> None:
    workspace.reachable = False
    rows = rows_by_check(tmp_path)
    assert rows["connection"].status == "to fix"  # type: ignore[attr-defined]
    assert {rows[n].status for n in ("secrets", "image", "volumes", "state store")} == {"skipped"}  # type: ignore[attr-defined]
    assert workspace.ops_named("secret_problem") == []


def test_doctor_skip_build_and_exit_codes(workspace: FakeModal, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", str(QWEN), "--skip-build"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "image" in result.output and "--skip-build" in result.output and workspace.images_built == []
    del workspace.secrets["wandb"]
    assert CliRunner().invoke(app, ["doctor", str(QWEN), "--skip-build"]).exit_code == 1


def test_validate_runs_the_backends_offline_rules(workspace: FakeModal, tmp_path: Path) -> None:
    text = QWEN.read_text().replace(
        "resources: {gpu: H100, gpus_per_node: 8, cpu: 32, memory_mb: 262144",
        "resources: {gpu: A10G, gpus_per_node: 8, cpu: 32, memory_mb: 262144",
    ).replace("base: verlai/verl:vllm024.dev2", "base: nvidia/cuda:12.8.1-devel-ubuntu22.04")
    (tmp_path / "data").mkdir()
    bad = tmp_path / "qwen.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "gpu: A10G" in t)
    assert f"{bad}:{line}:5 stages.sft.resources: 'A10G:8': Modal allows at most 4 A10G GPUs" in result.output
    assert "warning: image.pip 'flash-attn==2.8.3' has no wheel" in result.output
    ok = CliRunner().invoke(app, ["validate", str(QWEN)])
    assert ok.exit_code == 0 and "warning" not in ok.output


def test_plan_carries_the_backends_warnings(workspace: FakeModal, tmp_path: Path) -> None:
    from reconciler.refresh import refresh_and_plan

    (tmp_path / "data").mkdir()
    spec_path = tmp_path / "qwen.yaml"
    spec_path.write_text(QWEN.read_text().replace("base: verlai/verl:vllm024.dev2",
                                                  "base: nvidia/cuda:12.8.1-devel-ubuntu22.04"))
    loaded = load_spec(spec_path)
    plan = refresh_and_plan(loaded, None, ModalRuntime(str(tmp_path), adapter=workspace))
    assert any(w.startswith("image.pip 'flash-attn==2.8.3' has no wheel") for w in plan.warnings)
    clean = refresh_and_plan(load_spec(QWEN), None, ModalRuntime(str(tmp_path), adapter=workspace))
    assert not any("has no wheel" in w for w in clean.warnings)


def test_doctor_deploys_the_clustered_functions_in_a_probe_and_says_when_modal_refuses(
    workspace: FakeModal, tmp_path: Path
) -> None:
    """Multi-node clusters are in preview on Modal (access on request): doctor creates the 32B
    spec's clustered functions in a probe app, stops it again, and names the way to get access."""
    spec32 = load_spec(REPO / "specs" / "retool-qwen32b.yaml")
    rows = {r.check: r for r in doctor_rows(spec32, tmp_path / ".retool")}
    cluster = rows["multi-node clusters"]
    assert cluster.status == "ready" and "2 x H100:8" in cluster.detail
    (probe,) = [d for d in workspace.deploys if d.app_name.endswith("-cluster-probe")]
    assert {fn.name for fn in probe.functions} == {"stage-sft", "stage-grpo", "stage-ppo"}
    assert probe.app_name not in workspace.deployed and workspace.calls == {}  # stopped; nothing ran

    workspace.clusters_enabled = False
    refused = {r.check: r for r in doctor_rows(spec32, tmp_path / ".retool")}["multi-node clusters"]
    assert refused.status == "to fix" and "not enabled" in refused.detail
    assert "in preview" in refused.fix and "nodes: 1" in refused.fix
    assert "multi-node clusters" not in rows_by_check(tmp_path)  # the 7B spec has none
