"""What Modal would receive for a spec (runtime/modal/app.py), checked as data and through
the real Modal SDK offline (building an App makes no network call), plus the plan-time
checks for what Modal only validates on its servers."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from reconciler.loader import load_spec
from reconciler.steps import estimate, segments_for
from runtime.modal.adapter import SdkAdapter, parse_gpu_rates
from runtime.modal.limits import size_warnings
from tests.plan_helpers import qwen
from runtime.modal.app import build_app_definition, modal_problems, modal_warnings
from runtime.modal.images import image_steps, image_warnings

REPO = Path(__file__).resolve().parents[3]
QWEN = REPO / "specs" / "retool-qwen7b.yaml"


def is_local(op: str) -> bool:
    return op.startswith("add_local")


def assert_local_sources_come_last(ops: list[str]) -> None:
    """Modal refuses a build step after an `add_local_*` one (and only says so at deploy)."""
    first_local = next(i for i, op in enumerate(ops) if is_local(op))
    assert all(is_local(op) for op in ops[first_local:]), ops
    assert all(i < first_local for i, op in enumerate(ops) if not is_local(op)), ops


def test_image_chain_builds_everything_the_spec_asks_with_local_sources_last() -> None:
    spec = qwen(image__base="nvidia/cuda:12.8.1-devel-ubuntu22.04", image__apt=["git"], image__commands=["echo hi"],
                image__env={"PIP_NO_CACHE_DIR": "1"})
    image = spec.image
    steps = image_steps(image)
    ops = [s.op for s in steps]
    # the spec's base first; an image retool knows nothing about gets the spec's Python added
    assert ops[0] == "from_registry" and steps[0].args == [image.base]
    assert steps[0].options.get("add_python") == image.python
    assert_local_sources_come_last(ops)
    assert [a for s in steps if is_local(s.op) for a in s.args] == list(image.local_sources)
    # every entry the spec lists is built, with the installer it names
    installs = [s for s in steps if s.op.endswith("pip_install")]
    assert {s.op for s in installs} == {"uv_pip_install"}
    assert [a for s in installs for a in s.args] == list(image.pip)
    assert [a for s in steps if s.op == "apt_install" for a in s.args] == ["git"]
    assert [a for s in steps if s.op == "run_commands" for a in s.args] == ["echo hi"]
    assert {k: v for s in steps if s.op == "env" for k, v in s.env.items()} == dict(image.env)
    # system packages exist before pip runs; the env applies to every install and command;
    # commands see what pip installed
    position = {op: [i for i, o in enumerate(ops) if o == op] for op in set(ops)}
    installs_at = [i for i, o in enumerate(ops) if o.endswith("pip_install")]
    assert max(position["apt_install"]) < min(installs_at)
    assert max(position["env"]) < min(installs_at + position["run_commands"])
    assert max(installs_at) < min(position["run_commands"])
    pip_ops = {s.op for s in image_steps(qwen(image__installer="pip").image) if s.op.endswith("pip_install")}
    assert pip_ops == {"pip_install"}


def test_the_7b_image_starts_from_verls_vllm_image_and_compiles_nothing() -> None:
    """verl's application image carries torch, vLLM and flash-attn: the chain uses its own
    Python, skips what it provides, adds verl pinned without dependencies, retool last."""
    spec = load_spec(QWEN).spec
    steps = image_steps(spec.image)
    assert steps[0].args == ["verlai/verl:vllm024.dev2"] and steps[0].options == {}  # no second Python
    installs = [(s.op, s.args, s.options.get("extra_options", "")) for s in steps if s.op.endswith("pip_install")]
    assert installs == [
        ("uv_pip_install", ["transformers==5.9.0"], "--break-system-packages"),
        ("uv_pip_install", ["verl==0.9.1"], "--no-deps --break-system-packages"),
    ]
    assert_local_sources_come_last([s.op for s in steps])
    assert not any("flash-attn" in a for _, args, _ in installs for a in args)
    assert image_warnings(spec.image) == [] and modal_problems(spec, REPO) == []
    # the same pins on a plain CUDA image: flash-attn would compile, and validate/plan say so
    plain = qwen(image__base="nvidia/cuda:12.8.1-devel-ubuntu22.04").image
    assert any(w.startswith("image.pip 'flash-attn==2.8.3' has no wheel") and "verlai/verl:vllm024.dev2" in w
               for w in image_warnings(plain))
    # another flash-attn than the image's compiles too; apex from the image does not
    other = qwen(image__pip=["verl==0.9.1", "flash-attn==2.7.4", "apex"]).image
    warned = [w for w in image_warnings(other) if "no wheel" in w]
    assert len(warned) == 1 and "has 2.8.3" in warned[0]
    # the image runs Python 3.12: asking Modal to add another is refused at plan time
    assert modal_problems(qwen(image__python="3.11"), REPO) == [
        "image.python: verlai/verl:vllm024.dev2 runs its own Python 3.12 (its torch, vLLM and flash-attn live there); "
        "set image.python to '3.12'"
    ]


def test_resource_requests_are_checked_against_modals_documented_limits() -> None:
    spec = qwen(stages__sft__resources__gpu="A10G", stages__dapo__resources__nodes=40)
    problems = modal_problems(spec, REPO)
    assert "stages.sft.resources: 'A10G:8': Modal allows at most 4 A10G GPUs per container" in problems
    assert "stages.dapo.resources: 40 nodes exceed Modal's 32 nodes per cluster" in problems
    assert any("40 x 8 GPUs exceed Modal's 256 GPUs per cluster" in p for p in problems)
    half = modal_problems(qwen(stages__dapo__resources__nodes=2, stages__dapo__resources__gpus_per_node=4), REPO)
    assert "stages.dapo.resources: 'H100:4': each clustered container must take all 8 GPUs of its host" in half
    # CPU and memory: Modal publishes no maximum, so large requests warn and never block
    big = qwen(stages__dapo__resources__memory_mb=524288, stages__sft__resources__cpu=96)
    assert modal_problems(big, REPO) == []
    warned = modal_warnings(big)
    assert any(w.startswith("stages.dapo.resources: memory 524288 MiB (512 GiB) is above 336 GiB") for w in warned)
    assert any(w.startswith("stages.sft.resources: cpu 96 cores is above 64") for w in warned)


def test_functions_carry_gpu_strings_volumes_secret_names_and_24h_timeouts() -> None:
    spec = load_spec(QWEN).spec
    d = build_app_definition(spec)
    assert d.app_name == "retool-qwen7b"
    sft, dapo = d.function("stage-sft"), d.function("stage-dapo")
    assert sft.gpu == "H100:8" and dapo.gpu == "H100:8"
    assert sft.entry == "run_stage" and sft.timeout_s == 86400 and sft.retries == 2
    # each stage's container gets exactly the CPU and memory its spec requests, and every
    # function's request fits a Modal host (nothing Modal would refuse at deploy)
    for name, stage in spec.stages.items():
        fn = d.function(f"stage-{name}")
        assert (fn.cpu, fn.memory_mb) == (stage.resources.cpu, stage.resources.memory_mb), name
        assert fn.cpu is not None and fn.memory_mb is not None, name
    for fn in d.functions:
        assert size_warnings(cpu=fn.cpu, memory_mb=fn.memory_mb) == [], fn.name
    assert sft.volumes == {
        "/checkpoints": "retool-qwen7b-checkpoints", "/data": "retool-qwen7b-data", "/models": "retool-qwen7b-models",
    }
    assert sft.secrets == ["wandb", "huggingface"]
    assert sft.cluster_size is None
    assert d.function("prepare").secrets == ["huggingface"] and d.function("prepare").gpu is None
    assert d.function("finalize").gpu == "H100"
    evals = ["stage-eval_base", "stage-eval_sft", "stage-eval_dapo"]
    assert [f.name for f in d.functions] == ["stage-sft", "stage-dapo", *evals, "prepare", "finalize"]
    for name in evals:  # vLLM over 4 GPUs: Qwen2.5-7B's 28 heads do not split 8 ways
        assert (d.function(name).gpu, d.function(name).timeout_s) == ("H100:4", 12 * 3600)


def test_fallbacks_multinode_and_service_sandbox() -> None:
    spec = qwen(
        stages__dapo__resources__gpu_fallbacks=["A100-80GB"], stages__dapo__resources__nodes=2,
        sandbox__placement="service", sandbox__token_secret="sandbox", sandbox__replicas=2,
        secrets__sandbox={"modal_name": "retool-sandbox-token", "env": ["SANDBOX_TOKEN"]},
    )
    d = build_app_definition(spec)
    dapo = d.function("stage-dapo")
    assert dapo.gpu == ["H100:8", "A100-80GB:8"] and dapo.cluster_size == 2
    assert "retool-sandbox-token" in dapo.secrets
    web = d.function("sandbox")
    assert web.web and web.entry == "sandbox_web" and (web.min_containers, web.max_containers) == (2, 2)
    assert web.secrets == ["retool-sandbox-token"] and web.env["RETOOL_SANDBOX_TOKEN_VAR"] == "SANDBOX_TOKEN"


def test_no_secret_value_reaches_the_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-value-4f2a")
    monkeypatch.setenv("HF_TOKEN", "hf-value-9c1d")
    text = json.dumps(build_app_definition(load_spec(QWEN).spec).model_dump(mode="json"))
    assert "wandb-value-4f2a" not in text and "hf-value-9c1d" not in text
    assert "WANDB_API_KEY" not in text  # not even the variable: only the secret's Modal name


def test_segments_follow_the_per_attempt_limit() -> None:
    assert segments_for(60, 24) == 3  # a 60 h RL stage
    assert segments_for(24, 24) == 1 and segments_for(24.01, 24) == 2
    assert segments_for(10, 4) == 3 and segments_for(0, 24) == 0


def test_plan_time_checks_catch_what_modal_checks_remotely(tmp_path: Path) -> None:
    assert modal_problems(load_spec(QWEN).spec, REPO) == []
    spec = qwen(
        stages__dapo__resources__timeout_hours=30, image__local_sources=["reconciler", "nonexistent_pkg"],
        image__env={"WANDB_API_KEY": "x", "RAY_AUTH_MODE": "disabled"},
        sandbox__placement="service",
    )
    problems = modal_problems(spec, REPO)
    assert any(p.startswith("stages.dapo.resources.timeout_hours: 30 h exceeds Modal's 24 h") for p in problems)
    assert any("'nonexistent_pkg' is not a Python package" in p for p in problems)
    assert any(p.startswith("image.env.WANDB_API_KEY") for p in problems)
    assert any(p.startswith("sandbox.token_secret") for p in problems)
    assert len(problems) == 4


def test_a_stage_that_cannot_save_within_a_segment_is_refused_naming_its_fields() -> None:
    """A segment continues from its latest checkpoint: a save interval longer than a segment
    would end every segment with nothing new, and retries would repeat it forever."""
    from reconciler.loader import load_spec as load

    assert modal_problems(load(REPO / "specs/retool-qwen32b.yaml").spec, REPO) == []
    # 30 steps x 3600 s = 30 h > 23.75 h usable (24 h less the hand-over margin)
    spec = qwen(stages__dapo__save_freq=30, stages__dapo__seconds_per_step=3600)
    (problem,) = modal_problems(spec, REPO)
    assert problem.startswith("stages.dapo.save_freq: 30 steps x seconds_per_step 3600 s = 30.0 h")
    assert "resources.timeout_hours 24" in problem and "set save_freq to 23 or less" in problem
    assert modal_problems(qwen(stages__dapo__save_freq=23, stages__dapo__seconds_per_step=3600), REPO) == []
    shorter = qwen(stages__dapo__save_freq=10, stages__dapo__seconds_per_step=3600,
                   stages__dapo__resources__timeout_hours=8)  # 10 h > 7.75 h
    assert [p.split(":")[0] for p in modal_problems(shorter, REPO)] == ["stages.dapo.save_freq"]
    unknown = qwen(stages__dapo__save_freq=1000, stages__dapo__seconds_per_step=None)
    assert modal_problems(unknown, REPO) == []  # no estimate: nothing to judge


def test_mutable_tags_and_unpinned_requirements_warn() -> None:
    assert image_warnings(load_spec(QWEN).spec.image) == []
    assert any("mutable tag 'vllm024.latest'" in w for w in image_warnings(qwen(image__base="verlai/verl:vllm024.latest").image))
    warned = image_warnings(qwen(image__base="nvidia/cuda:latest", image__pip=["verl", "numpy==2.1"]).image)
    assert any("mutable tag 'latest'" in w for w in warned)
    assert any("'verl' is not pinned" in w for w in warned) and not any("numpy" in w for w in warned)
    assert any("no tag" in w for w in image_warnings(qwen(image__base="ubuntu").image))
    digest = "ubuntu@sha256:" + "a" * 64
    assert image_warnings(qwen(image__base=digest, image__pip=["verl==0.9.1"]).image) == []


def stage_cost(rates: dict[str, float], gpu: str, gpus: int, steps: int, seconds: float) -> float:
    """Dollars the plan estimates for `steps` steps on `gpus` GPUs priced with these billing rates."""
    spec = qwen(stages__sft__resources__gpu=gpu, stages__sft__resources__gpus_per_node=gpus)
    pricing = spec.pricing.model_copy(update={"gpu_hour_usd": parse_gpu_rates(rates)})
    return estimate(steps, spec.stages["sft"].resources, pricing, seconds, "spec").usd


def test_billing_rates_price_a_stage_as_steps_times_seconds_times_gpus_times_rate() -> None:
    """Modal's billing rates are dollars per GPU-second: a stage costs steps × seconds per step ×
    GPUs × that rate, whichever way the workspace spells the GPU."""
    rates = {"gpu.h100": 0.001097, "gpu.a100-80gb": 0.000694, "cpu": 0.0000131}
    assert stage_cost(rates, "H100", 8, 372, 75.0) == pytest.approx(372 * 75.0 * 8 * 0.001097, abs=0.01)
    assert stage_cost(rates, "A100-80GB", 4, 100, 30.0) == pytest.approx(100 * 30.0 * 4 * 0.000694, abs=0.01)
    assert stage_cost(rates, "H100!", 8, 372, 75.0) == stage_cost(rates, "H100", 8, 372, 75.0)
    # a rate quoted per GPU-hour prices the same stage the same
    assert stage_cost({"H100": 0.001097 * 3600}, "H100", 8, 372, 75.0) == stage_cost(rates, "H100", 8, 372, 75.0)
    # what is no GPU's rate never prices a GPU
    assert set(parse_gpu_rates(rates)) == {"H100", "H100!", "A100-80GB"}


# --------------------------------------------------------------------------- the real SDK, offline


def test_real_sdk_builds_the_app_offline_with_local_sources_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """`modal` builds App/Image/Function objects without a network call: the same code that
    deploys, minus the deploy. The container later imports runtime.modal.worker and finds
    each entry point by its implementation name."""
    pytest.importorskip("modal")
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    spec = qwen(
        stages__dapo__resources__nodes=2, sandbox__placement="service", sandbox__token_secret="wandb",
    )
    definition = build_app_definition(spec)
    adapter = SdkAdapter()
    app = adapter.build_app(definition)
    from modal._utils.async_utils import synchronizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # registered_functions is deprecated in favour of nothing public
        functions = {name: synchronizer._translate_in(fn) for name, fn in app.registered_functions.items()}
    assert sorted(functions) == ["finalize", "prepare", "sandbox", "stage-dapo", "stage-eval_base", "stage-eval_dapo",
                                 "stage-eval_sft", "stage-sft"]
    sft = functions["stage-sft"]
    want = definition.function("stage-sft")
    assert sft._spec.gpus == want.gpu and sft._spec.cpu == want.cpu and sft._spec.memory == want.memory_mb
    assert sorted(sft._spec.volumes) == ["/checkpoints", "/data", "/models"]
    assert (sft._source_info.module_name, sft._source_info.implementation_name) == ("runtime.modal.worker", "run_stage")
    assert functions["sandbox"]._webhook_config is not None
    # Modal rejects build steps after add_local_* only when it builds: our chain ends with it.
    image = adapter.build_image(definition.image)
    assert type(image).__name__ == "Image"
    assert "modal" in sys.modules


def test_real_sdk_without_a_token_fails_fast_with_a_login_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("modal")
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    adapter = SdkAdapter()
    if adapter.credentials_problem() is None:
        pytest.skip("a Modal token is configured on this machine")
    from reconciler.errors import TerminalError

    with pytest.raises(TerminalError) as exc:
        adapter.volume_exists("anything")
    assert "modal token new" in exc.value.hint and "MODAL_TOKEN_ID" in exc.value.hint


def run_pin_step(tmp_path: Path, interpreters: dict[str, str]) -> tuple[int, list[str]]:
    """Runs the known base's first build step in a shell whose PATH holds stub interpreters
    (name -> the version it reports), with /usr/local/bin mapped to a folder of ours."""
    from runtime.modal.images import VERL_VLLM_024, image_steps

    local_bin, stubs = tmp_path / "usr-local-bin", tmp_path / "bin"
    local_bin.mkdir(parents=True)
    stubs.mkdir(parents=True)
    for name, version in interpreters.items():
        stub = stubs / name
        major, minor = version.split(".")
        # `-c 'print(...)'` prints the version; `-c 'assert ... == (3, 12)'` passes only for 3.12
        stub.write_text(f'#!/bin/sh\ncase "$2" in *assert*) case "$2" in *"({major}, {minor})"*) exit 0;; '
                        f'*) exit 1;; esac;; *) echo {version};; esac\n')
        stub.chmod(0o755)
    steps = image_steps(qwen(image__base=VERL_VLLM_024).image)
    assert steps[1].op == "run_commands"  # right after the base: before any pip step uses `python`
    command = steps[1].args[0].replace("/usr/local/bin/", f"{local_bin}/")
    env = {"PATH": f"{local_bin}:{stubs}:/usr/bin:/bin"}
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, check=False)
    return done.returncode, sorted(p.name for p in local_bin.iterdir())


def test_the_known_base_image_makes_python_its_own_interpreter_before_installing(tmp_path: Path) -> None:
    """modal's uv_pip_install runs `uv pip install --python $(command -v python)`: the image's
    Python must be `python` on PATH, whatever the base ships."""
    assert run_pin_step(tmp_path / "a", {"python3.12": "3.12"}) == (0, ["python"])  # no `python`: linked
    assert run_pin_step(tmp_path / "b", {"python3.12": "3.12", "python": "3.10"}) == (0, ["python"])  # the wrong one
    assert run_pin_step(tmp_path / "c", {"python3.12": "3.12", "python": "3.12"}) == (0, [])  # already right
    assert run_pin_step(tmp_path / "d", {"python": "3.10"})[0] != 0  # no 3.12 at all: the build fails here
    unknown = image_steps(qwen(image__base="nvidia/cuda:12.4.1-runtime-ubuntu22.04", image__python="3.11").image)
    assert unknown[0].options == {"add_python": "3.11"} and unknown[1].op != "run_commands"  # Modal's own Python
