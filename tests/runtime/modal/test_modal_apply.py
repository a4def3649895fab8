"""`specs/retool-qwen7b.yaml` applied end to end on the fake Modal, through the real plan and
apply engine (reconciler.apply) and the real ModalRuntime: what Modal receives, what state
records, and how runs survive the CLI going away.

The fake's containers (tests/fakes/fake_modal.py `Containers`) write what the real worker
would: verl checkpoints with every shard of the world size, the tracker, progress and result
files, the merged model; the real worker itself is tested with real processes in
tests/runtime/modal/test_modal_worker.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.engine import ApplyResult, apply, stage_context
from reconciler.graph import build_graph
from reconciler.loader import LoadedSpec, load_spec
from reconciler.refresh import refresh_and_plan
from reconciler.state.memory import MemoryStore
from runtime.modal.layout import stage_function_name
from runtime.modal.backend import ModalRuntime
from runtime.modal.images import image_steps
from tests.fakes.fake_modal import Containers, FakeModal

REPO = Path(__file__).resolve().parents[3]
WANDB_VALUE = "wandb-secret-value-8d1f"
HF_VALUE = "hf_secret_value_77aa"


@pytest.fixture
def loaded() -> LoadedSpec:
    return load_spec(REPO / "specs" / "retool-qwen7b.yaml")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeModal:
    # The values exist on this machine and in Modal's secrets; neither may leak anywhere.
    monkeypatch.setenv("WANDB_API_KEY", WANDB_VALUE)
    monkeypatch.setenv("HF_TOKEN", HF_VALUE)
    return FakeModal(
        secrets={"wandb": {"WANDB_API_KEY": WANDB_VALUE}, "huggingface": {"HF_TOKEN": HF_VALUE}},
        rates={"H100": 3.5},
    )


def containers(fake: FakeModal, loaded: LoadedSpec, **kw: Any) -> Containers:
    c = Containers(**kw)
    c.install(fake, [stage_function_name(s) for s in loaded.spec.stages])
    return c


def run(loaded: LoadedSpec, store: MemoryStore, rt: ModalRuntime, **kw: Any) -> ApplyResult:
    plan = refresh_and_plan(loaded, store.read(), rt)
    return apply(plan, loaded, store, rt, sleep=lambda s: None, poll_interval=0, **kw)


def spawned(fake: FakeModal, function: str) -> list[Any]:
    return [c for c in fake.calls.values() if c.function == function]


def test_qwen7b_applies_end_to_end_with_what_modal_should_receive(loaded: LoadedSpec, fake: FakeModal) -> None:
    containers(fake, loaded)
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    plan = refresh_and_plan(loaded, store.read(), rt)
    assert plan.change("stage.dapo").estimate.segments == 3  # 400 steps × 540 s = 60 h at 24 h per attempt
    result = run(loaded, store, rt)
    assert result.ok, [r for r in result.results if r.result == "failed"]
    state = store.read()
    assert state is not None
    assert {a: r.status for a, r in state.nodes.items()} == {a: "succeeded" for a in build_graph(loaded.spec).nodes}

    # volumes, named after the pipeline
    assert sorted(fake.volumes) == ["retool-qwen7b-checkpoints", "retool-qwen7b-data", "retool-qwen7b-models"]
    # one deploy, carrying the spec's image chain (built from its base, retool's own packages
    # added after every build step); GPU strings; secrets by name
    assert len(fake.deploys) == 1
    app = fake.deploys[0]
    assert app.image == image_steps(loaded.spec.image)
    assert app.image[0].op == "from_registry" and app.image[0].args == [loaded.spec.image.base]
    ops = [s.op for s in app.image]
    first_local = next(i for i, op in enumerate(ops) if op.startswith("add_local"))
    assert all(op.startswith("add_local") for op in ops[first_local:]) and first_local > 0
    assert [a for s in app.image[first_local:] for a in s.args] == ["reconciler", "runtime", "sandbox"]
    assert any(s.args == ["verl==0.9.1"] and "--no-deps" in s.options.get("extra_options", "") for s in app.image)
    assert app.function("stage-sft").gpu == "H100:8" and app.function("stage-dapo").gpu == "H100:8"
    assert app.function("stage-dapo").secrets == ["wandb", "huggingface"]

    # the stage functions got exactly `retool render`'s commands for their contexts
    for name in ("sft", "dapo"):
        (call,) = spawned(fake, f"stage-{name}")
        rec = state.nodes[f"stage.{name}"]
        ctx = stage_context(loaded, state, build_graph(loaded.spec).nodes[f"stage.{name}"],
                            restart_id=rec.restart_id, total=rec.total_steps, resume_from=None, state_dir="/unused")
        assert call.payload["commands"] == [c.model_dump(mode="json") for c in rt.render_stage(ctx)]
        assert call.payload["checkpoint_dir"] == f"/checkpoints/{name}/{rec.restart_id[:16]}"
        assert rec.run is not None and rec.run.ref.call_id == call.call_id and rec.run.ref.app_name == "retool-qwen7b"
    dapo_cmd = spawned(fake, "stage-dapo")[0].payload["commands"][0]
    assert "/root/runtime/verl/recipe/tool_config.yaml" in " ".join(dapo_cmd["argv"])  # container paths, not ours
    assert dapo_cmd["env"]["RETOOL_SANDBOX_URL"].startswith("http://127.0.0.1:")
    assert spawned(fake, "stage-dapo")[0].payload["sidecar"]["port"] == 8765

    # RL consumed SFT's merged model; the containers saw the secrets, nothing else did
    assert state.nodes["stage.dapo"].inputs["stage.sft"] == state.nodes["stage.sft"].output_id
    assert state.nodes["stage.sft"].outputs["model_path"] == f"/checkpoints/sft/{state.nodes['stage.sft'].restart_id[:16]}/merged"
    # each eval stage graded its own model's samples: the base model, SFT's merged model, RL's final one
    for name, model in (("eval_base", "/models/models/qwen7b"), ("eval_sft", state.nodes["stage.sft"].outputs["model_path"]),
                        ("eval_dapo", state.nodes["stage.dapo"].outputs["model_path"])):
        (call,) = spawned(fake, f"stage-{name}")
        job = json.loads(fake.volumes["retool-qwen7b-checkpoints"][f"{name}/{state.nodes[f'stage.{name}'].restart_id[:16]}/job.json"])
        assert (job["model_dir"], job["samples"], job["gpus"], job["max_assistant_turns"]) == (model, 30, 4, 16)
        results = state.nodes[f"stage.{name}"].outputs["results"]
        assert sorted(results) == ["aime_2024", "aime_2025"] and results["aime_2024"]["mean_at_n"] == pytest.approx(1 / 3)
    everything = json.dumps([
        state.model_dump(mode="json"), [d.model_dump(mode="json") for d in fake.deploys],
        [c.payload for c in fake.calls.values()], {v: sorted(f) for v, f in fake.volumes.items()},
        [f.decode(errors="replace") for files in fake.volumes.values() for f in files.values()],
    ])
    for value in (WANDB_VALUE, HF_VALUE):
        assert value not in everything
    assert spawned(fake, "stage-sft")[0].env["WANDB_API_KEY"] == WANDB_VALUE  # attached as a Modal secret


def test_second_apply_is_a_no_op(loaded: LoadedSpec, fake: FakeModal) -> None:
    containers(fake, loaded)
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    assert run(loaded, store, rt).ok
    calls, deploys, serial = len(fake.calls), len(fake.deploys), store.read().serial  # type: ignore[union-attr]
    fresh = ModalRuntime("/unused", adapter=fake)  # a new CLI process
    plan = refresh_and_plan(loaded, store.read(), fresh)
    assert not plan.has_changes
    result = apply(plan, loaded, store, fresh, sleep=lambda s: None)
    assert result.ok and all(r.result == "unchanged" for r in result.results)
    assert (len(fake.calls), len(fake.deploys), store.read().serial) == (calls, deploys, serial)  # type: ignore[union-attr]


def test_more_eval_samples_resume_and_draw_only_the_new_ones(loaded: LoadedSpec, fake: FakeModal, tmp_path: Path) -> None:
    c = containers(fake, loaded)
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    assert run(loaded, store, rt).ok
    assert c.drawn == [30 * 2 * 3] * 3  # 30 samples × 2 datasets × 3 problems, per eval stage
    text = (REPO / "specs" / "retool-qwen7b.yaml").read_text()
    block = text.index("  eval_dapo:\n")
    edited = tmp_path / "retool-qwen7b.yaml"
    edited.write_text(text[:block] + text[block:].replace("samples: 30", "samples: 40", 1))
    more = load_spec(edited)
    plan = refresh_and_plan(more, store.read(), rt)
    assert {ch.address: ch.action for ch in plan.changes if ch.action != "no-op"} == {"stage.eval_dapo": "resume"}
    assert plan.change("stage.eval_dapo").resume_from == 30  # type: ignore[union-attr]
    assert apply(plan, more, store, rt, sleep=lambda s: None, poll_interval=0).ok
    assert c.drawn[3:] == [10 * 2 * 3]  # only rounds 30..39
    assert store.read().nodes["stage.eval_dapo"].outputs["samples"] == 40  # type: ignore[union-attr]


def test_a_killed_cli_reattaches_by_call_id_and_never_relaunches(loaded: LoadedSpec, fake: FakeModal) -> None:
    c = containers(fake, loaded, hold=True)
    store = MemoryStore()
    first = ModalRuntime("/unused", adapter=fake)
    result = run(loaded, store, first, wait=False)  # the CLI leaves while stage.sft runs
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.status == "running" and rec.run is not None
    (call,) = spawned(fake, "stage-sft")
    assert rec.run.ref.call_id == call.call_id
    assert not any(r.address == "stage.dapo" and r.result == "succeeded" for r in result.results)

    # Training (and the base model's evaluation, which needs no SFT) finishes on Modal while nobody watches.
    held = [k.call_id for k in fake.calls.values() if k.function.startswith("stage-") and k.state == "running"]
    assert call.call_id in held and len(held) == 2
    for call_id in held:
        c.advance(fake, call_id)
    second = ModalRuntime("/unused", adapter=fake)  # a new CLI process, same cloud
    plan = refresh_and_plan(loaded, store.read(), second)
    assert plan.change("stage.sft").action == "no-op"  # observed as finished, nothing to relaunch
    c.hold = False
    assert run(loaded, store, second).ok
    assert len(spawned(fake, "stage-sft")) == 1  # re-attached, never relaunched
    assert store.read().nodes["stage.sft"].status == "succeeded"  # type: ignore[union-attr]


def test_an_unreachable_modal_leaves_a_running_stage_alone(loaded: LoadedSpec, fake: FakeModal) -> None:
    from reconciler.errors import TerminalError

    containers(fake, loaded, hold=True)
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    run(loaded, store, rt, wait=False)
    before = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    fake.reachable = False
    plan = refresh_and_plan(loaded, store.read(), rt)
    assert not plan.refreshed and any("stage.sft: cannot observe its run" in w for w in plan.warnings)
    with pytest.raises(TerminalError, match="did not answer"):  # preflight: nothing starts
        apply(plan, loaded, store, rt, sleep=lambda s: None)
    # Reachable for the preflight, then polls time out (a partial outage mid-apply).
    fake.reachable, fake.unreachable_ops = True, {"poll"}
    result = apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert not result.ok
    failed = next(r for r in result.results if r.address == "stage.sft")
    assert "it was not relaunched" in failed.message
    after = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert after.status == "running" and after.run == before.run  # kept; the next apply re-attaches
    assert len(spawned(fake, "stage-sft")) == 1


def test_long_stages_run_as_chained_segments(loaded: LoadedSpec, fake: FakeModal) -> None:
    containers(fake, loaded, steps_per_call=150, save_freq=50)  # each call trains 150 steps, then hands over
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    assert run(loaded, store, rt).ok
    sft_calls = spawned(fake, "stage-sft")
    assert [c.payload["segment"] for c in sft_calls] == [0, 1, 2]  # 372 steps: 150 + 150 + 72
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.run.ref.call_id == sft_calls[0].call_id and rec.steps_done == 372  # type: ignore[union-attr]
    status = rt.poll_stage(rec.run)  # type: ignore[arg-type]
    assert status.state == "succeeded" and "segment 2" in status.message


def test_plan_without_credentials_works_from_recorded_state(loaded: LoadedSpec, fake: FakeModal) -> None:
    containers(fake, loaded, hold=True)
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    run(loaded, store, rt, wait=False)
    fake.token = False
    plan = refresh_and_plan(loaded, store.read(), ModalRuntime("/unused", adapter=fake))
    assert not plan.refreshed
    assert any("No Modal credentials" in w for w in plan.warnings)
    assert plan.change("stage.sft").action == "no-op"  # still the recorded running run


def test_apply_without_credentials_stops_before_changing_anything(loaded: LoadedSpec, fake: FakeModal) -> None:
    from reconciler.errors import TerminalError

    fake.token = False
    store, rt = MemoryStore(), ModalRuntime("/unused", adapter=fake)
    plan = refresh_and_plan(loaded, store.read(), rt)
    with pytest.raises(TerminalError) as exc:
        apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert "No Modal credentials" in str(exc.value) and "modal token new" in str(exc.value)
    assert fake.ops == [] and store.read() is None and fake.volumes == {}


@pytest.mark.parametrize("base", ["verlai/verl", "verlai/verl:latest", "ghcr.io/org/img:latest"])
def test_the_plan_warns_about_a_mutable_image_tag(loaded: LoadedSpec, fake: FakeModal, base: str) -> None:
    rt = ModalRuntime("/unused", adapter=fake)
    pinned = refresh_and_plan(loaded, None, rt)
    assert not any("image.base" in w for w in pinned.warnings)
    edited = loaded.model_copy(update={"spec": loaded.spec.model_copy(
        update={"image": loaded.spec.image.model_copy(update={"base": base})})})
    warned = refresh_and_plan(edited, None, rt)
    assert any(w.startswith(f"image.base {base!r}") and "pin a version tag or @sha256 digest" in w
               for w in warned.warnings), warned.warnings
