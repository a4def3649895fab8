"""What Modal would receive for a spec (runtime/modal/app.py), checked as data and through
the real Modal SDK offline (building an App makes no network call), plus the plan-time
checks for what Modal only validates on its servers."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from reconciler.loader import load_spec
from runtime.modal.adapter import SdkAdapter, parse_gpu_rates
from tests.plan_helpers import qwen
from runtime.modal.app import (
    build_app_definition,
    image_steps,
    image_warnings,
    modal_problems,
    segments_for,
)

REPO = Path(__file__).resolve().parents[3]
QWEN = REPO / "specs" / "retool-qwen7b.yaml"


def test_image_chain_in_modal_order_with_local_sources_last() -> None:
    spec = qwen(image__apt=["git"], image__commands=["echo hi"])
    steps = image_steps(spec.image)
    assert [s.op for s in steps] == [
        "from_registry", "apt_install", "env", "uv_pip_install", "run_commands", "add_local_python_source",
    ]
    assert steps[0].args == ["nvidia/cuda:12.8.1-devel-ubuntu22.04"] and steps[0].options == {"add_python": "3.12"}
    assert steps[3].args == ["verl[vllm]==0.9.1", "flash-attn==2.8.3"]
    assert steps[-1].args == ["reconciler", "runtime", "sandbox"]
    assert image_steps(qwen(image__installer="pip").image)[2].op == "pip_install"


def test_functions_carry_gpu_strings_volumes_secret_names_and_24h_timeouts() -> None:
    d = build_app_definition(load_spec(QWEN).spec)
    assert d.app_name == "retool-qwen7b"
    sft, dapo = d.function("stage-sft"), d.function("stage-dapo")
    assert sft.gpu == "H100:8" and dapo.gpu == "H100:8"
    assert sft.entry == "run_stage" and sft.timeout_s == 86400 and sft.retries == 2
    assert (sft.cpu, sft.memory_mb, dapo.memory_mb) == (32.0, 262144, 524288)
    assert sft.volumes == {
        "/checkpoints": "retool-qwen7b-checkpoints", "/data": "retool-qwen7b-data", "/models": "retool-qwen7b-models",
    }
    assert sft.secrets == ["wandb", "huggingface"]
    assert sft.cluster_size is None
    assert d.function("prepare").secrets == ["huggingface"] and d.function("prepare").gpu is None
    assert d.function("finalize").gpu == "H100"
    assert [f.name for f in d.functions] == ["stage-sft", "stage-dapo", "prepare", "finalize"]


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


def test_mutable_tags_and_unpinned_requirements_warn() -> None:
    assert image_warnings(load_spec(QWEN).spec.image) == []
    warned = image_warnings(qwen(image__base="nvidia/cuda:latest", image__pip=["verl", "numpy==2.1"]).image)
    assert any("mutable tag 'latest'" in w for w in warned)
    assert any("'verl' is not pinned" in w for w in warned) and not any("numpy" in w for w in warned)
    assert any("no tag" in w for w in image_warnings(qwen(image__base="ubuntu").image))
    digest = "ubuntu@sha256:" + "a" * 64
    assert image_warnings(qwen(image__base=digest).image) == []


def test_billing_rates_map_to_gpu_hour_prices() -> None:
    rates = parse_gpu_rates({"gpu.h100": 0.001097, "gpu.a100-80gb": 0.000694, "cpu": 0.0000131, "H200": 4.54})
    assert rates["H100"] == pytest.approx(3.9492) and rates["H100!"] == rates["H100"]
    assert rates["A100-80GB"] == pytest.approx(2.4984) and rates["H200"] == 4.54
    assert "cpu" not in rates


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
    assert sorted(functions) == ["finalize", "prepare", "sandbox", "stage-dapo", "stage-sft"]
    sft = functions["stage-sft"]
    assert sft._spec.gpus == "H100:8" and sft._spec.cpu == 32.0 and sft._spec.memory == 262144
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
