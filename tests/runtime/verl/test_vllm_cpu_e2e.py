"""verl's own vLLM rollout, and vLLM evaluation, on CPU (vLLM's CPU build, the `vllm` extra).

One combined test, so CI pays for the tiny SFT (shared with test_rl_e2e.py) and the vLLM
start-ups once:

    A  the tiny spec's RL stage as rendered with `rollout.name=vllm`: GRPO with the tool agent
       loop, code_interpreter calls that reach the sandbox, a checkpoint each step; kill -9 of
       the whole run once step 2's checkpoint is complete (no clean shutdown, no exit file)
    B  the rendered resume from step 2: step 3 only, "Resuming from .../global_step_2"
    W  weight sync: at every step verl compares vLLM's probabilities of the tokens it sampled
       with the FSDP actor's (`training/rollout_probs_diff_mean`); they agree within float
       tolerance at steps 1-3, while the actor of step 3 gives a fixed prompt's tokens
       probabilities far from the SFT model's (the rollout really follows a moving actor), and
       vLLM loading that step's merged weights reproduces the actor's log-probs
    E  the eval stage's runner on the SFT model with vLLM and with the transformers engine, same
       seeds: accuracy, tool calls and response lengths agree within sampling noise

The larger learning rate and entropy bonus are test_rl_e2e.py's (the actor must move in a step).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from runtime.eval.job import EvalJob
from runtime.eval.samples import RESULTS_FILE
from runtime.metrics import parse_text
from runtime.processes import RUN_TAG_ENV, tagged_processes
from runtime.verl.common import TRACKER_FILE
from runtime.verl.rl import ENV_VLLM_CPU_KVCACHE, VLLM
from runtime.verl.sft import render_merge
from tests.runtime.verl.test_rl_e2e import (
    RUN_TIMEOUT_S, SPECS, Run, executions, rl_command, rl_inputs, run_command, tiny_spec,
)

__all__ = ["rl_inputs"]  # the fixture, shared with test_rl_e2e.py

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the `vllm` extra)"),
]

# vLLM's default dtype for the rollout is bfloat16 (the recipe's); the actor is float32 on CPU.
VLLM_SYNC_BOUND = 5e-3  # mean |p_vllm - p_actor| over sampled tokens (bf16 rollout): 6.8e-4 seen
# A fixed prompt's token probabilities: vLLM (float32) on the step-3 weights vs the actor
# must agree to float32 noise; the step-3 actor vs the SFT model must differ by far more.
# Seen: 7.7e-9 (same weights), 1.8e-3 (three steps at lr 1e-3).
SAME_WEIGHTS_BOUND = 1e-5
PROMPT = "Compute 12 * 7 with the code interpreter, then box the answer."


def _kill_run(proc: subprocess.Popen[bytes], tag: str) -> None:
    """kill -9 the run's process group and every process carrying its tag (Ray's and vLLM's
    workers live in sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group had already ended
    proc.wait()
    for _ in range(100):
        left = tagged_processes(tag)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed run survive: {tagged_processes(tag)}")


def _run_until_checkpoint(cmd_env: dict[str, str], argv: list[str], ckpt: Path, step: int) -> tuple[Run, str]:
    """Start the rendered command, SIGKILL it once the tracker names `step` and the step's
    metrics are logged (verl prints them after the checkpoint)."""
    tag = uuid.uuid4().hex
    log_path = ckpt / "rl.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **cmd_env, RUN_TAG_ENV: tag}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ckpt, start_new_session=True)
        try:
            while time.monotonic() - start < RUN_TIMEOUT_S and proc.poll() is None:
                tracker = ckpt / TRACKER_FILE
                if tracker.is_file() and tracker.read_text().strip() == str(step) and any(
                    r.step == step and "training/global_step" in r.values
                    for r in parse_text(log_path.read_text(errors="replace"))
                ):
                    break
                time.sleep(0.5)
        finally:
            rc = proc.poll()
            _kill_run(proc, tag)
    text = log_path.read_text(errors="replace")
    return Run(rc=rc if rc is not None else -signal.SIGKILL, wall_s=time.monotonic() - start, log=text,
               records=parse_text(text)), tag


def _logprobs_script(model: str, engine: str, prompt_ids: list[int]) -> str:
    """A child process (vLLM starts its engine in subprocesses) printing the log-probability
    of each of `prompt_ids[1:]` given the tokens before it."""
    if engine == VLLM:
        body = f"""
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={model!r}, dtype="float32", max_model_len=512, seed=0)
out = llm.generate([TokensPrompt(prompt_token_ids={prompt_ids!r})], SamplingParams(max_tokens=1, prompt_logprobs=0))
ids = {prompt_ids!r}
lps = [d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])]
"""
    else:
        body = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({model!r}, torch_dtype=torch.float32)
ids = torch.tensor([{prompt_ids!r}])
with torch.no_grad():
    logits = model(ids).logits[0, :-1].float()
lps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].tolist()
"""
    return "import json\nif __name__ == '__main__':\n" + "\n".join(
        "    " + line for line in (body + "print('LOGPROBS', json.dumps(lps))").strip().splitlines()
    )


def _logprobs(model: Path, engine: str, prompt_ids: list[int], log_path: Path) -> list[float]:
    env = {**os.environ, ENV_VLLM_CPU_KVCACHE: "1"}
    with log_path.open("w") as log:
        rc = subprocess.run([sys.executable, "-c", _logprobs_script(str(model), engine, prompt_ids)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
    text = log_path.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    line = next(line for line in text.splitlines() if line.startswith("LOGPROBS "))
    return [float(x) for x in json.loads(line.removeprefix("LOGPROBS "))]


def _eval(model: Path, engine: str, data: dict[str, str], sandbox: str, out: Path, top_p: float = 1.0) -> dict:
    job = EvalJob(
        stage="eval_sft", model_dir=str(model), datasets=data, samples=4, temperature=1.0, top_p=top_p, seed=0,
        max_prompt_length=512, max_response_length=256, max_assistant_turns=4, max_user_turns=4,
        max_tool_response_length=256, engine=engine, batch_size=64, gpus=0, device="cpu",
        sandbox_url=sandbox, tool_timeout_s=10, tool_num_workers=2, tool_rate_limit=4, out_dir=str(out),
    )
    out.mkdir(parents=True)
    (out / "job.json").write_text(job.model_dump_json())
    with (out / "eval.log").open("w") as log:
        rc = subprocess.run([sys.executable, "-m", "runtime.eval.run", str(out / "job.json")], stdout=log,
                            stderr=subprocess.STDOUT, timeout=900, env={**os.environ, ENV_VLLM_CPU_KVCACHE: "1"}).returncode
    assert rc == 0, (out / "eval.log").read_text(errors="replace")[-3000:]
    return json.loads((out / RESULTS_FILE).read_text())


def test_vllm_rollout_grpo_kill_resume_weight_sync_and_vllm_eval(
    rl_inputs: dict, sandbox: str, sft_model: Path, tmp_path: Path,
) -> None:
    # A: three steps planned, kill -9 once step 2 is checkpointed.
    ckpt = tmp_path / "rl"
    ckpt.mkdir()
    before = executions(sandbox)
    cmd = rl_command(rl_inputs, sandbox, ckpt, steps=3, resume_from=None, rollout=VLLM)
    args = dict(a.split("=", 1) for a in cmd.argv if "=" in a)
    assert args["actor_rollout_ref.rollout.name"] == "vllm" and args["actor_rollout_ref.rollout.mode"] == "async"
    assert "runtime.verl.vllm_cpu" in cmd.env["VERL_USE_EXTERNAL_MODULES"]
    a, _ = _run_until_checkpoint(cmd.env, [sys.executable, *cmd.argv[1:]], ckpt, step=2)
    print(f"run A (killed after step 2's checkpoint): {a.wall_s:.0f} s")
    assert a.rc is None or a.rc < 0, f"run A ended by itself (rc {a.rc}):\n{a.log[-4000:]}"
    assert {1, 2} <= set(a.steps()), a.log[-4000:]
    assert "vLLMHttpServer" in a.log or "vllm" in a.log.lower()
    assert executions(sandbox) > before, "the policy made no code_interpreter call that reached the sandbox"
    for s in (1, 2):
        assert a.value(s, "training/rollout_probs_diff_valid") == 1.0
        assert a.value(s, "training/rollout_probs_diff_mean") < VLLM_SYNC_BOUND, a.value(s, "training/rollout_probs_diff_mean")
        print(f"step {s}: timing_s/step {a.value(s, 'timing_s/step'):.1f}, gen {a.value(s, 'timing_s/gen'):.1f}, "
              f"probs diff {a.value(s, 'training/rollout_probs_diff_mean'):.2e}")
    assert a.value(1, "actor/grad_norm") > 0, "step 1 had no gradient: nothing to sync"
    assert (ckpt / TRACKER_FILE).read_text().strip() == "2"

    # B: the rendered resume from step 2.
    b = run_command(rl_command(rl_inputs, sandbox, ckpt, steps=3, resume_from=2, rollout=VLLM), ckpt / "rl_b.log")
    print(f"run B (resume): {b.wall_s:.0f} s")
    assert b.rc == 0, b.log[-4000:]
    assert b.steps() == [3], "a resumed run must continue at step 3, not start over"
    assert f"Resuming from {ckpt}/global_step_2" in b.log
    assert (ckpt / TRACKER_FILE).read_text().strip() == "3"
    assert b.value(3, "training/rollout_probs_diff_mean") < VLLM_SYNC_BOUND

    # W: the actor moved away from the SFT model, and vLLM on its weights gives its log-probs.
    merged = tmp_path / "merged"
    merge = run_command(render_merge(f"{ckpt}/global_step_3/actor", str(merged)), tmp_path / "merge.log")
    assert merge.rc == 0, merge.log[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sft_model))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(str(text) + "I will run the code.\n<tool_call>", add_special_tokens=False)
    sft_lp = _logprobs(sft_model, "transformers", ids, tmp_path / "lp_sft.log")
    actor_lp = _logprobs(merged, "transformers", ids, tmp_path / "lp_actor.log")
    vllm_lp = _logprobs(merged, VLLM, ids, tmp_path / "lp_vllm.log")
    moved = sum(abs(math.exp(x) - math.exp(y)) for x, y in zip(actor_lp, sft_lp)) / len(ids[1:])
    synced = sum(abs(math.exp(x) - math.exp(y)) for x, y in zip(actor_lp, vllm_lp)) / len(ids[1:])
    print(f"fixed prompt, mean |dp|: actor step 3 vs SFT {moved:.2e}; vLLM vs actor {synced:.2e}")
    assert synced < SAME_WEIGHTS_BOUND, "vLLM on the trained weights does not reproduce the actor"
    assert moved > 10 * SAME_WEIGHTS_BOUND, "the actor did not move: the sync would be untested"

    # E: the eval runner with vLLM and with transformers on the SFT model.
    from runtime.data.prepare import prepare

    spec = tiny_spec()
    test_data = prepare("tiny_math_test", spec.datasets["tiny_math_test"], tmp_path / "eval_data", SPECS)
    data = {"tiny_math_test": test_data.path}
    started = time.monotonic()
    by_vllm = _eval(sft_model, VLLM, data, sandbox, tmp_path / "eval_vllm")
    vllm_s = time.monotonic() - started
    by_hf = _eval(sft_model, "transformers", data, sandbox, tmp_path / "eval_hf")
    print(f"eval: vLLM {vllm_s:.0f} s, {by_vllm['tokens_per_s']} tok/s; transformers {by_hf['tokens_per_s']} tok/s")
    assert by_vllm["engine"] == VLLM and by_vllm["device"] == "cpu" and by_hf["engine"] == "transformers"
    v, h = by_vllm["datasets"]["tiny_math_test"], by_hf["datasets"]["tiny_math_test"]
    n = v["problems"] * v["samples_per_problem"]
    print(f"eval metrics: vLLM {v}\ntransformers {h}")
    # Two independent estimates of the same accuracy: 4 standard errors of their difference.
    p = (v["mean_at_n"] + h["mean_at_n"]) / 2
    assert abs(v["mean_at_n"] - h["mean_at_n"]) <= 4 * math.sqrt(2 * max(p * (1 - p), 1 / n) / n)
    assert abs(v["mean_tool_calls"] - h["mean_tool_calls"]) <= 0.5 * max(v["mean_tool_calls"], h["mean_tool_calls"], 1)
    assert abs(v["mean_response_tokens"] - h["mean_response_tokens"]) <= 0.35 * max(v["mean_response_tokens"], h["mean_response_tokens"])
