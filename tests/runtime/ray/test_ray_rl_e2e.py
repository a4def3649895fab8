"""GRPO RL with tool calls as a Ray job on a real loopback cluster, across two nodes
(`resources: {nodes: 2, processes_per_node: 1}`: verl's trainer.nnodes=2; on CPU verl places
each trainer rank on a "GPU" resource, so GPU-declaring nodes are what it needs). The
cluster starts with one such node: `retool doctor` names what is missing. A second joins (as
an autoscaler's would) and apply runs verl's `main_ppo` as the job's entrypoint; it joins the
cluster, and its workers on both nodes (started by the raylets, with the stage's environment
through the job's runtime_env) run the multi-turn agent loop against the sandbox job's URL.
The policy is the session's tiny SFT model (tests/conftest.py, a `path:` model here), which
calls the tool: the calls must reach the sandbox job, and the checkpoint holds a shard from
each node's rank. SFT as a Ray job is test_ray_cluster_e2e.py's and
test_ray_multinode_e2e.py's; RL's single-node rendering is the units' and the local backend's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.ray_cluster import RayCluster, running
from tests.runtime.ray.test_ray_cluster_e2e import jobs, ok, retool, status

pytestmark = pytest.mark.slow


def rl_spec(address: str, storage: Path, sft_model: Path) -> dict[str, object]:
    return {
        "name": "ray-e2e", "backend": "ray", "ray": {"address": address, "storage": str(storage)},
        "volumes": {"data": {"mount": "/data"}, "models": {"mount": "/models"}, "checkpoints": {"mount": "/c"}},
        "sandbox": {"placement": "sidecar", "workers": 2},
        "datasets": {
            # the problems the session's SFT model was trained on (the tiny spec's)
            "tiny_math": {"source": "builtin:tiny_math", "format": "rl",
                          "options": {"rows": 16, "seed": 1, "problems": "fixed_shape"}},
            "tiny_math_test": {"source": "builtin:tiny_math", "format": "rl",
                               "options": {"rows": 4, "seed": 7, "problems": "fixed_shape", "heldout": True}},
        },
        "models": {"sft": {"source": f"path:{sft_model}"}},
        "stages": {
            "rl": {
                "kind": "rl", "model": "model.sft", "train": "dataset.tiny_math", "resources": {"processes_per_node": 1},
                "max_steps": 1, "train_batch_size": 4, "ppo_mini_batch_size": 4, "max_prompt_length": 512,
                "max_response_length": 128, "ppo_max_token_len_per_gpu": 4096, "log_prob_max_token_len_per_gpu": 4096,
                "ulysses_sequence_parallel_size": 1, "param_offload": False, "optimizer_offload": False,
                "rollout": {"engine": "auto", "n": 2, "tensor_parallel_size": 1, "max_assistant_turns": 2,
                            "max_user_turns": 2},
                "validation": {"n": 1, "before_train": False},
                "tool": {"timeout_s": 10, "num_workers": 2, "rate_limit": 4}, "save_freq": 1, "test_freq": 100,
            },
            # The RL model's evaluation, as a job of its own on the cluster, through the same sandbox job.
            "eval_rl": {
                "kind": "eval", "model": "stage.rl", "datasets": ["dataset.tiny_math_test"], "samples": 2,
                "engine": "transformers", "max_response_length": 128, "max_assistant_turns": 2, "max_user_turns": 2,
                "tool": {"timeout_s": 10, "num_workers": 2, "rate_limit": 4},
            },
        },
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running(worker_gpus=1)


def test_rl_with_tool_calls_runs_across_two_ray_nodes(cluster: RayCluster, sft_model: Path) -> None:
    root = cluster.root / "repo"
    (root / ".git").mkdir(parents=True)
    spec = rl_spec(cluster.address, cluster.storage, sft_model)
    spec["stages"]["rl"]["resources"] = {"nodes": 2, "processes_per_node": 1}  # type: ignore[index]
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    doctor = retool("doctor", "spec.yaml", "--skip-build", cwd=root)
    assert doctor.returncode != 0 and "2 node(s) declaring 1 GPU resource(s) each" in doctor.stdout, doctor.stdout
    cluster.add_node("worker-2", cpus=4, gpus=1)

    ok(retool("apply", "spec.yaml", "--yes", cwd=root))
    nodes = json.loads((cluster.storage / ".retool-state" / "ray-e2e" / "state.json").read_text())["nodes"]
    assert nodes["stage.rl"]["status"] == "succeeded" and nodes["stage.rl"]["outputs"]["final_step"] == 1
    assert (Path(nodes["stage.rl"]["outputs"]["model_path"]) / "config.json").is_file()
    assert [status(j) for j in jobs(cluster, "stage-rl")] == ["SUCCEEDED"]
    actor = Path(nodes["stage.rl"]["outputs"]["checkpoint"]) / "actor"
    assert sorted(p.name for p in actor.glob("model_world_size_*_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt",  # a shard from each node's rank
    ]
    metrics = nodes["stage.rl"]["outputs"]["final_metrics"]  # parsed from the job's log (get_job_logs)
    # The multi-turn agent loop ran in the cluster's workers, the policy called the tool (a
    # tool response adds two turns to the plain answer's two) and the calls reached the
    # sandbox job (it counts the code it ran), and the reward was computed.
    assert metrics["num_turns/mean"] > 2 and "critic/score/mean" in metrics, metrics
    url = nodes["sandbox"]["outputs"]["url"]
    assert httpx.get(url + "/health", timeout=10).json()["executions"] > 0
    # The evaluation ran as a Ray job too and graded every sample of the RL model.
    assert nodes["stage.eval_rl"]["status"] == "succeeded"
    assert [status(j) for j in jobs(cluster, "stage-eval_rl")] == ["SUCCEEDED"]
    graded = nodes["stage.eval_rl"]["outputs"]["results"]["tiny_math_test"]
    assert graded["problems"] == 4 and graded["samples_per_problem"] == 2 and set(graded["pass_at_k"]) == {"1", "2"}
    assert graded["mean_tool_calls"] > 0  # its answers called the tool through the sandbox job as well
