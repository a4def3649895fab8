"""Multi-node stages on the Modal backend, without running them: the 32B spec (2 nodes x 8 H100
per stage) plans unblocked, its rendered commands compose in verl's hydra, a launch spawns
one clustered function for the whole stage, cost counts every node; the local backend
refuses more than one node with its reason."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from reconciler.backend import StageContext
from reconciler.loader import parse_spec_text
from reconciler.spec import Spec
from runtime.local.backend import LocalRuntime
from runtime.modal.layout import stage_function_name
from runtime.modal.app import build_app_definition
from runtime.modal.backend import ModalRuntime
from runtime.verl.common import compose_config
from tests.fakes.fake_modal import FakeModal
from tests.plan_helpers import qwen

REPO = Path(__file__).resolve().parents[3]
SPEC_32B = REPO / "specs" / "retool-qwen32b.yaml"
RID = "3b" * 32
INPUTS = {
    "dataset.dapo_math": {"path": "/data/datasets/dapo_math/train.parquet"},
    "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"},
    "dataset.retool_sft": {"path": "/data/datasets/retool_sft/train.parquet"},
    "model.qwen32b": {"path": "/models/models/qwen32b"},
    "stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
    "sandbox": {"placement": "sidecar", "url": "http://127.0.0.1:8765"},
}


def spec_32b() -> Spec:
    return parse_spec_text(SPEC_32B.read_text(), str(SPEC_32B))


def ready(spec: Spec) -> tuple[FakeModal, ModalRuntime]:
    fake = FakeModal(secrets={name: {var: "v" for var in ref.env} for name, ref in
                              ((ref.modal_name or key, ref) for key, ref in spec.secrets.items())})
    for key in spec.volumes:
        fake.create_volume(f"{spec.name}-{key}")
    return fake, ModalRuntime("/unused", adapter=fake, ping=lambda url: True, clock=lambda: 1000.0)


def ctx(spec: Spec, stage: str, total: int) -> StageContext:
    return StageContext(spec=spec, spec_dir=str(SPEC_32B.parent), stage=stage, restart_id=RID, total_steps=total,
                        inputs=INPUTS)


def test_the_32b_stages_are_not_blocked_on_modal_and_each_is_one_cluster_of_two_hosts() -> None:
    spec = spec_32b()
    _, rt = ready(spec)
    for name in ("sft", "grpo", "ppo"):
        assert spec.stages[name].resources.nodes == 2
        assert rt.blocked_reason(spec, f"stage.{name}") is None
    d = build_app_definition(spec)
    fn = d.function(stage_function_name("sft"))
    assert fn.cluster_size == 2 and fn.gpu == "H100:8"  # modal.clustered(size=2, rdma=True), whole hosts


def test_the_32b_renders_compose_in_verls_hydra() -> None:
    spec = spec_32b()
    _, rt = ready(spec)
    (sft, _merge) = rt.render_stage(ctx(spec, "sft", 372))
    # every node runs this torchrun; the worker adds --node_rank and rank 0's address (runtime.cluster)
    assert sft.argv[:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=8"] and "--standalone" not in sft.argv
    cfg = compose_config(sft.argv, sft.env)
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (2, 8)
    (grpo, _merge) = rt.render_stage(ctx(spec, "grpo", 150))
    assert grpo.argv[:3] == ["python", "-m", "verl.trainer.main_ppo"]
    assert not any(a.startswith(("ray_kwargs.ray_init.num", "+ray_kwargs.ray_init.num")) for a in grpo.argv)
    cfg = compose_config(grpo.argv, grpo.env)
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (2, 8)
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "vllm"


def test_a_launch_spawns_one_clustered_call_and_its_cost_counts_every_node() -> None:
    spec = spec_32b()
    fake, rt = ready(spec)
    handle = rt.launch_stage(ctx(spec, "sft", 372))
    call = fake.calls[handle.ref.call_id]
    assert call.function == "stage-sft" and fake.deployed[call.app_name].function("stage-sft").cluster_size == 2
    assert (call.payload["nodes"], call.payload["world_size"]) == (2, 16)
    assert handle.ref.gpus == 16  # GPU-seconds and dollars count both hosts
    # rank 0 reports what it sees of every rank; status says it
    vol = f"{spec.name}-checkpoints"
    fake.write(vol, f"sft/{RID[:16]}/_retool/progress.json",
               '{"step": 3, "total": 372, "active_s": 100, "updated_at": 990,'
               ' "ranks": {"0": {"state": "alive", "seen_at": 990}, "1": {"state": "lost", "seen_at": 900}}}')
    status = rt.poll_stage(handle)
    assert status.state == "running" and "nodes: 0 alive, 1 lost" in status.message
    assert status.metrics["nodes_alive"] == 1.0 and status.metrics["gpu_seconds"] == 1600.0


def test_the_local_backend_refuses_more_than_one_node(tmp_path: Path) -> None:
    spec = parse_spec_text((REPO / "specs" / "retool-tiny.yaml").read_text())
    data = spec.model_dump(mode="json", exclude_unset=True)
    data["stages"]["sft"]["resources"] = {"nodes": 2, "processes_per_node": 1}
    two = Spec.model_validate(data)
    reason = LocalRuntime(str(tmp_path)).blocked_reason(two, "stage.sft") or ""
    assert "asks for 2 nodes, but the local backend runs on one machine" in reason and "backend: modal" in reason
    assert LocalRuntime(str(tmp_path)).blocked_reason(spec, "stage.sft") is None


def test_the_real_sdk_registers_each_multi_node_stage_as_a_cluster_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """modal 1.6.4 builds the clustered functions without a network call: `modal.clustered(size=2,
    rdma=True)` under `app.function(gpu="H100:8")` for each stage, nothing else clustered."""
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    from modal._utils.async_utils import synchronizer

    from runtime.modal.adapter import SdkAdapter

    app = SdkAdapter().build_app(build_app_definition(spec_32b()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # registered_functions is deprecated in favour of nothing public
        functions = {name: synchronizer._translate_in(fn) for name, fn in app.registered_functions.items()}
    for name in ("stage-sft", "stage-grpo", "stage-ppo"):
        cluster = functions[name]._function_info.cluster_info
        assert (cluster.size, cluster.rdma) == (2, True) and functions[name]._spec.gpus == "H100:8"
    assert functions["prepare"]._function_info.cluster_info is None
    assert functions["finalize"]._function_info.cluster_info is None


def test_h100_clusters_get_efa_as_modals_guide_sets_it_and_the_spec_can_turn_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`modal.efa: auto` (the default) enables EFA on clustered H100 functions, with its system
    libraries in the image; single-node functions never get it; `off`/`on` override."""
    import modal

    from runtime.modal.adapter import SdkAdapter

    spec = spec_32b()
    d = build_app_definition(spec)
    efa = {fn.name for fn in d.functions if fn.efa}
    assert efa == {stage_function_name(n) for n in ("sft", "grpo", "ppo")}
    (apt,) = [s for s in d.image if s.op == "apt_install"]
    assert {"libhwloc15", "libnl-route-3-200"} <= set(apt.args)
    assert d.image.index(apt) < min(i for i, s in enumerate(d.image) if s.op.endswith("pip_install"))

    seen: dict[str, Any] = {}
    original = modal.App.function

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen[kwargs["name"]] = kwargs.get("experimental_options")
        return original(self, *args, **kwargs)

    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.setattr(modal.App, "function", spy)
    SdkAdapter().build_app(d)
    assert seen["stage-grpo"] == {"efa_enabled": True} and seen["prepare"] is None

    off = build_app_definition(spec.model_copy(update={"modal": spec.modal.model_copy(update={"efa": "off"})}))
    assert not any(fn.efa for fn in off.functions) and not any(s.op == "apt_install" for s in off.image)
    assert not any(fn.efa for fn in build_app_definition(qwen()).functions)  # 7B: one node per stage
