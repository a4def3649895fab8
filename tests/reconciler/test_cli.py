"""The `retool` CLI through typer's CliRunner, with the in-memory runtime injected through
`set_runtime_override` and the real local state store in a temp directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reconciler.backends import set_runtime_override
from reconciler.cli.main import app
from reconciler.errors import TerminalError
from reconciler.state.base import LockInfo, State
from reconciler.state.local import LocalStore
from reconciler.state.memory import MemoryStore
from tests.fakes.memory_runtime import MemoryRuntime
from tests.fakes.pipeline import spec_dict, write_spec
from tests.reconciler.state.test_state_contract import hold_local_lock

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def rt() -> Iterator[MemoryRuntime]:
    runtime = MemoryRuntime()
    set_runtime_override(lambda spec, state_dir: runtime)
    yield runtime
    set_runtime_override(None)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path, spec_dict())


def invoke(*args: Any, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    env = {"COLUMNS": "200", **(env or {})}
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def store_of(spec: Path) -> LocalStore:
    return LocalStore(spec.parent / ".retool")


# --------------------------------------------------------------------------- validate, schema


def test_validate_accepts_a_good_spec(spec: Path) -> None:
    result = invoke("validate", spec)
    assert result.exit_code == 0
    assert "is valid: 10 nodes" in result.stdout
    assert not (spec.parent / ".retool").exists()


def test_validate_reports_errors_in_one_block_without_traceback(tmp_path: Path) -> None:
    bad = write_spec(tmp_path, spec_dict(**{"stages.sft.epochs": -1, "stages.sft.optimm": {}}))
    result = invoke("validate", bad)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert f"{bad}:" in result.stderr and "epochs" in result.stderr and "optimm" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    bad = write_spec(tmp_path, spec_dict(**{"stages.sft.epochs": -1}))
    result = invoke("--debug", "validate", bad)
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_schema_prints_json_schema() -> None:
    result = invoke("schema")
    schema = json.loads(result.stdout)
    assert result.exit_code == 0 and "stages" in schema["properties"]


# --------------------------------------------------------------------------- plan


def test_plan_text_and_detailed_exit_code(spec: Path, rt: MemoryRuntime) -> None:
    result = invoke("plan", spec)
    assert result.exit_code == 0
    assert "create  stage.sft" in result.stdout
    assert invoke("plan", spec, "--detailed-exitcode").exit_code == 2
    assert invoke("apply", spec, "--yes").exit_code == 0
    assert invoke("plan", spec, "--detailed-exitcode").exit_code == 0


def test_plan_json_is_the_only_thing_on_stdout(spec: Path, rt: MemoryRuntime) -> None:
    result = invoke("plan", spec, "--json")
    data = json.loads(result.stdout)
    assert data["serial"] == 0 and data["has_changes"] is True
    assert [c["action"] for c in data["changes"]] == ["create"] * 10
    assert [c["reason_codes"] for c in data["changes"]] == [["not_created"]] * 10
    assert invoke("plan", spec, "--format", "json").stdout.count('"address"') == 10


def test_plan_markdown(spec: Path, rt: MemoryRuntime) -> None:
    result = invoke("plan", spec, "--format", "markdown")
    assert result.stdout.startswith("### retool plan: `demo` (local)")
    assert "| `+` | `stage.sft` | create |" in result.stdout


def test_plan_target_and_unknown_address(spec: Path, rt: MemoryRuntime) -> None:
    data = json.loads(invoke("plan", spec, "--json", "--target", "dataset.sft_data").stdout)
    assert [c["address"] for c in data["changes"]] == ["volume.data", "dataset.sft_data"]
    result = invoke("plan", spec, "--target", "stage.nope")
    assert result.exit_code == 1 and "unknown address stage.nope" in result.stderr


def test_plan_works_from_recorded_state_when_the_backend_is_unavailable(spec: Path, rt: MemoryRuntime) -> None:
    assert invoke("apply", spec, "--yes").exit_code == 0

    def unavailable(spec: Any, state_dir: str) -> Any:
        raise TerminalError("Modal credentials missing")

    set_runtime_override(unavailable)
    result = invoke("plan", spec, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["refreshed"] is False
    assert any("Modal credentials missing" in w for w in data["warnings"])
    assert {c["action"] for c in data["changes"]} == {"no-op"}
    # apply, by contrast, cannot go on without its backend
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 1 and "error: Modal credentials missing" in result.stderr


# --------------------------------------------------------------------------- apply


def test_apply_asks_first_and_honours_no(spec: Path, rt: MemoryRuntime) -> None:
    result = invoke("apply", spec, input="n\n")
    assert result.exit_code == 1 and "Apply cancelled." in result.stdout
    assert store_of(spec).read() is None and not rt.calls_to("ensure_volume")
    result = invoke("apply", spec, input="y\n")
    assert result.exit_code == 0 and "Apply complete" in result.stdout


def test_apply_yes_records_state_beside_the_spec(spec: Path, rt: MemoryRuntime) -> None:
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 0, result.stderr
    state = store_of(spec).read()
    assert state is not None and state.nodes["stage.rl"].status == "succeeded"
    assert "✓ stage.sft" in result.stderr  # transitions stream to stderr
    again = invoke("apply", spec, "--yes")
    assert again.exit_code == 0 and "No changes. Nothing to apply." in again.stdout


def test_saved_plan_applies_exactly_and_then_goes_stale(spec: Path, rt: MemoryRuntime, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    result = invoke("plan", spec, "--out", plan_file)
    assert result.exit_code == 0 and f"retool apply {plan_file}" in result.stdout
    assert invoke("apply", plan_file).exit_code == 0  # no prompt for a saved plan
    result = invoke("apply", plan_file)
    assert result.exit_code == 1
    assert "error: Saved plan is stale" in result.stderr
    assert "Plan:" not in result.stdout  # refused before it is shown as if it would apply
    assert "state serial moved from 0 to" in result.stderr and "run `retool plan` again." in result.stderr


def test_saved_plan_is_stale_once_the_spec_changes(spec: Path, rt: MemoryRuntime, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    invoke("plan", spec, "--out", plan_file)
    write_spec(spec.parent, spec_dict(**{"stages.sft.epochs": 3}))
    result = invoke("apply", plan_file)
    assert result.exit_code == 1 and "changed since the plan was made" in result.stderr
    assert store_of(spec).read() is None
    assert "cannot change a saved plan" in invoke("apply", plan_file, "--target", "image").stderr


def test_apply_reports_failures_and_exit_code(spec: Path, rt: MemoryRuntime) -> None:
    rt.fail_when(lambda c: c.method == "prepare_model", "terminal")
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 1
    assert "Apply finished with errors" in result.stdout
    assert "model.base: injected terminal failure" in result.stdout
    assert "stage.sft  skipped because model.base failed" in result.stderr


def test_apply_stops_at_blocked(spec: Path, rt: MemoryRuntime) -> None:
    rt.blocked = {"stage.rl": "RL needs a GPU"}
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 1
    assert "Stopped before stage.rl: RL needs a GPU" in result.stdout


def test_no_wait_then_status_then_cancel(spec: Path, rt: MemoryRuntime) -> None:
    assert invoke("apply", spec, "--yes", "--no-wait").exit_code == 0
    data = json.loads(invoke("status", spec, "--json").stdout)
    sft = next(n for n in data["nodes"] if n["address"] == "stage.sft")
    assert (sft["sync"], sft["health"]) == ("in sync", "progressing")
    result = invoke("cancel", spec, "stage.sft")
    assert result.exit_code == 0 and "cancelled stage.sft" in result.stdout
    data = json.loads(invoke("status", spec, "--json").stdout)
    sft = next(n for n in data["nodes"] if n["address"] == "stage.sft")
    assert sft["health"] == "failed" and sft["action"] == "resume"


class SharedStore(MemoryStore):
    """A shared (non-local) store that can become unreachable, like Modal without a token."""

    reachable = True

    def describe(self) -> str:
        return "shared test store"

    def _check(self) -> None:
        if not self.reachable:
            raise TerminalError("No credentials for the shared store", hint="log in")

    def read(self) -> State | None:
        self._check()
        return super().read()

    def lock(self, info: LockInfo) -> str:
        self._check()
        return super().lock(info)

    def lock_info(self) -> LockInfo | None:
        self._check()
        return super().lock_info()


def test_unreachable_shared_store_plans_from_the_local_copy(
    spec: Path, rt: MemoryRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = SharedStore()
    monkeypatch.setattr("reconciler.cli.main.get_store", lambda spec, state_dir: shared)
    shared.reachable = False
    # No copy yet: plan previews against no state and says so; status refuses to guess.
    data = json.loads(invoke("plan", spec, "--json").stdout)
    assert {c["action"] for c in data["changes"]} == {"create"}
    assert any("no local copy: this plan assumes nothing exists yet" in w for w in data["warnings"])
    result = invoke("status", spec)
    assert result.exit_code == 1 and "error: No credentials for the shared store" in result.stderr
    shared.reachable = True
    assert invoke("apply", spec, "--yes").exit_code == 0
    shared.reachable = False
    data = json.loads(invoke("plan", spec, "--json").stdout)
    assert {c["action"] for c in data["changes"]} == {"no-op"}
    assert data["refreshed"] is False
    assert any("state store unreachable (No credentials for the shared store); using the local copy of serial 14"
               in w for w in data["warnings"])
    status = json.loads(invoke("status", spec, "--json").stdout)
    assert {n["health"] for n in status["nodes"]} == {"healthy"}
    result = invoke("apply", spec, "--yes")  # apply never works from the copy
    assert result.exit_code == 1 and "No credentials for the shared store" in result.stderr


# --------------------------------------------------------------------------- locks


def test_held_lock_names_its_holder_and_unlock_needs_the_right_id(spec: Path, rt: MemoryRuntime) -> None:
    store = store_of(spec)
    holder = LockInfo(command="retool apply other.yaml")
    store.lock(holder)
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 1
    assert "error: State is locked by" in result.stderr and "retool apply other.yaml" in result.stderr
    assert invoke("state", "unlock", "wrong-id", spec).exit_code == 1
    result = invoke("state", "unlock", holder.id, "--state-dir", spec.parent / ".retool")
    assert result.exit_code == 0 and f"unlocked {holder.id}" in result.stdout
    assert invoke("apply", spec, "--yes").exit_code == 0


def test_live_holder_refuses_apply_before_any_plan_is_printed(spec: Path, rt: MemoryRuntime) -> None:
    holder = hold_local_lock(spec.parent / ".retool")
    try:
        result = invoke("apply", spec, "--yes")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert "error: State is locked by" in result.stderr and f"(pid {holder.pid})" in result.stderr
    assert "retool apply held.yaml" in result.stderr
    assert result.stdout == "" and not rt.calls  # no plan, no refresh: the lock comes first


def test_a_killed_holders_lock_frees_itself_and_apply_continues(spec: Path, rt: MemoryRuntime) -> None:
    holder = hold_local_lock(spec.parent / ".retool")
    holder.kill()
    holder.wait()
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 0, result.stderr
    assert f"previous apply (pid {holder.pid}, `retool apply held.yaml`) died; continuing" in result.stderr
    assert "Apply complete" in result.stdout
    assert store_of(spec).lock_info() is None
    again = invoke("apply", spec, "--yes")  # the note is said once: the dead holder's info is gone
    assert again.exit_code == 0 and "died" not in again.stderr


# --------------------------------------------------------------------------- status, state, render


def test_status_after_apply_and_after_an_edit(spec: Path, rt: MemoryRuntime) -> None:
    invoke("apply", spec, "--yes")
    data = json.loads(invoke("status", spec, "--json").stdout)
    assert {n["sync"] for n in data["nodes"]} == {"in sync"}
    assert {n["health"] for n in data["nodes"]} == {"healthy"}
    write_spec(spec.parent, spec_dict(**{"stages.rl.max_steps": 5}))
    rl = next(n for n in json.loads(invoke("status", spec, "--json").stdout)["nodes"] if n["address"] == "stage.rl")
    assert (rl["action"], rl["reason_codes"]) == ("resume", ["resume_fields_changed"])
    text = invoke("status", spec).stdout
    assert "stage.rl" in text and "out of sync" in text and "3/3" in text


def test_state_show(spec: Path, rt: MemoryRuntime) -> None:
    assert "no state" in invoke("state", "show", spec).stdout
    invoke("apply", spec, "--yes")
    text = invoke("state", "show", spec).stdout
    assert "serial 14" in text and "stage.sft" in text and "16/16" in text
    data = json.loads(invoke("state", "show", spec, "--json").stdout)
    assert data["serial"] == 14


def test_render_prints_argv_and_secret_names_only(tmp_path: Path, rt: MemoryRuntime) -> None:
    data = spec_dict(**{"secrets": {"wandb": {"env": ["WANDB_API_KEY"]}}, "stages.sft.secrets": ["wandb"],
                        "stages.sft.env": {"TOKENIZERS_PARALLELISM": "false"}})
    path = write_spec(tmp_path, data)
    result = invoke("render", path, "stage.sft", env={"WANDB_API_KEY": "super-secret-value"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# stage.sft: restart id " + lines[0].split()[4] + " 16 steps, from scratch"
    start = lines.index("RETOOL_STAGE=sft \\")
    assert lines[start:start + 6] == [
        "RETOOL_STAGE=sft \\", "    TOKENIZERS_PARALLELISM=false \\", "    python \\", "    -m \\",
        "    verl.trainer.sft_trainer \\", "    trainer.total_training_steps=16",
    ]
    assert "secrets (values never shown): WANDB_API_KEY" in result.stdout
    assert "super-secret-value" not in result.stdout + result.stderr
    assert invoke("render", path, "stage.nope").exit_code == 1
    both = json.loads(invoke("render", path, "--json").stdout)
    assert [r["address"] for r in both] == ["stage.sft", "stage.rl"]


def test_sandbox_serve_calls_the_sandbox_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    fake = types.ModuleType("sandbox.server")
    fake.serve = lambda host, port, **options: seen.update(host=host, port=port, **options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sandbox.server", fake)
    result = invoke("sandbox", "serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "3",
                    "--token-env", "SBX_TOKEN", env={"SBX_TOKEN": "t0k"})
    assert result.exit_code == 0, result.stderr
    assert seen == {"host": "0.0.0.0", "port": 9000, "workers": 3, "token": "t0k"}


# --------------------------------------------------------------------------- real processes


def test_console_script_with_runtime_from_environment(spec: Path) -> None:
    """The installed entry point, a separate process, its runtime named by RETOOL_TEST_RUNTIME."""
    env = {**os.environ, "RETOOL_TEST_RUNTIME": "tests.fakes.memory_runtime:make_runtime", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", "from reconciler.cli.main import main; main()", "plan", str(spec), "--detailed-exitcode"],
        env=env, capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "create  stage.sft" in proc.stdout


def test_plan_imports_no_training_or_cloud_stack(spec: Path) -> None:
    """`retool plan` on the real local backend never imports torch, verl, ray or modal."""
    code = (
        "import sys\nfrom reconciler.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'verl', 'ray', 'modal', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, code, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RETOOL_TEST_RUNTIME"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "plan", str(spec)], env=env, capture_output=True, text=True, cwd=REPO,
    )
    assert "HEAVY [] 0" in proc.stderr, proc.stderr


def test_usage_errors_are_usage_errors_not_internal_errors(spec: Path) -> None:
    result = invoke("plan", spec, "--format", "xml")
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert "'xml' is not one of" in result.stderr
    assert invoke("plan", spec.parent).exit_code == 2  # a directory, not a spec file


def test_a_broken_saved_plan_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "plan.json"
    broken.write_text('{"changes": 3, "serial": "x"}')
    result = invoke("apply", broken)
    assert result.exit_code == 1 and "internal error" not in result.stderr
    assert f"error: {broken} is not a valid saved plan" in result.stderr
