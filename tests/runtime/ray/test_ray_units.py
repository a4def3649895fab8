"""The Ray backend's pure parts: the spec, submission ids, entrypoint resources, the
lease lock's files, and that plan stays free of `import ray`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from reconciler.spec import Spec
from reconciler.state.shared_dir import FileKeys
from runtime.ray import jobs
from runtime.ray.backend import RAY_INIT_RESOURCES, RayRuntime, entrypoint_resources
from runtime.ray.cluster import Node, fit_problem

REPO = Path(__file__).resolve().parents[3]


def spec(**extra: object) -> Spec:
    return Spec.model_validate({"name": "demo", "backend": "ray", "ray": {"storage": "/shared/retool"}, **extra})


def stage(**resources: object) -> object:
    s = spec(
        models={"m": {"source": "builtin:tiny-qwen2"}}, datasets={"d": {"source": "builtin:tiny_sft", "format": "messages"}},
        stages={"sft": {"kind": "sft", "model": "model.m", "train": "dataset.d", "resources": resources}},
    )
    return s.stages["sft"]


def test_backend_ray_keeps_its_state_in_the_shared_storage_and_needs_it() -> None:
    assert spec().state.store == "ray"
    assert spec(state={"store": "local"}).state.store == "local"  # unless the spec says otherwise
    with pytest.raises(ValidationError, match="ray.storage is required"):
        Spec.model_validate({"name": "demo", "backend": "ray"})
    with pytest.raises(ValidationError, match="absolute path"):
        Spec.model_validate({"name": "demo", "backend": "ray", "ray": {"storage": "shared"}})


def test_submission_ids_count_attempts_of_one_identity() -> None:
    def job(sid: str) -> SimpleNamespace:
        return SimpleNamespace(submission_id=sid)

    rid = "ab" * 32
    assert jobs.next_submission_id("demo", "stage-sft", rid, []) == f"retool-demo-stage-sft-{rid[:12]}-1"
    listed = [job(f"retool-demo-stage-sft-{rid[:12]}-2"), job(f"retool-demo-stage-sft-{rid[:12]}-10"),
              job(f"retool-demo-stage-rl-{rid[:12]}-1"), job("someone-else")]
    mine = jobs.jobs_of(listed, "demo", "stage-sft", rid)  # type: ignore[arg-type]
    assert [j.submission_id[-2:] for j in mine] == ["-2", "10"]
    assert jobs.next_submission_id("demo", "stage-sft", rid, mine).endswith("-11")


def test_entrypoint_resources_follow_the_stage() -> None:
    assert entrypoint_resources(stage(processes_per_node=2)) == {"entrypoint_num_cpus": 2}  # type: ignore[arg-type]
    gpu = entrypoint_resources(stage(gpu="A100-80GB", gpus_per_node=4, cpu=16, memory_mb=1024))  # type: ignore[arg-type]
    assert gpu == {
        "entrypoint_num_cpus": 16, "entrypoint_num_gpus": 4, "entrypoint_memory": 1024 * 2**20,
        "entrypoint_resources": {"accelerator_type:A100-80G": 0.001},
    }


def test_fit_names_missing_gpus() -> None:
    nodes = [Node("a", "10.0.0.1", {"GPU": 8, "accelerator_type:H100": 1, "CPU": 64}), Node("b", "10.0.0.2", {"CPU": 8})]
    assert fit_problem(stage(gpu="H100", gpus_per_node=8), nodes) is None  # type: ignore[arg-type]
    problem = fit_problem(stage(gpu="H100", gpus_per_node=8, nodes=2), nodes)  # type: ignore[arg-type]
    assert problem and "nodes with that many H100: 1" in problem


def test_volumes_live_under_the_storage(tmp_path: Path) -> None:
    rt = RayRuntime(str(tmp_path / ".retool"))
    assert rt.volume_dir(spec(), "ckpt") == Path("/shared/retool/volumes/ckpt")
    assert rt.blocked_reason(spec(), "stage.none") is None


def test_rl_commands_leave_the_cluster_resources_to_ray() -> None:
    assert all(flag.startswith(("+ray_kwargs", "ray_kwargs")) for flag in RAY_INIT_RESOURCES)


def test_file_keys_put_if_absent_get_and_pop(tmp_path: Path) -> None:
    keys = FileKeys(tmp_path)
    assert keys.put("lock", "a", if_absent=True)
    assert not keys.put("lock", "b", if_absent=True)
    assert keys.get("lock") == "a"
    keys.put("lock", "c")
    assert keys.pop("lock") == "c" and keys.pop("lock") is None and keys.get("lock") is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary files left behind


def test_plan_of_a_ray_spec_does_not_import_ray(tmp_path: Path) -> None:
    (tmp_path / "storage").mkdir()
    (tmp_path / "spec.yaml").write_text(
        f"name: demo\nbackend: ray\nray: {{storage: {tmp_path}/storage}}\nvolumes: {{data: {{mount: /data}}}}\n"
    )
    code = (
        "import sys\nfrom reconciler.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('HEAVY', [m for m in ('ray', 'torch', 'verl') if m in sys.modules], code, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "plan", "spec.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert "HEAVY [] 0" in proc.stderr, proc.stdout + proc.stderr  # plan exits 0 unless --detailed-exitcode
    assert "create  volume.data" in proc.stdout
