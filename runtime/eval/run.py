"""`python -m runtime.eval.run JOB.json`: draw, grade and keep samples, then summarise.

Incremental and resumable: samples already in `samples.jsonl` are kept and only the missing
ones are drawn, round by round (sample 0 of every problem, then sample 1, ...), in batches
that are graded and appended as they finish. The log names every new draw, and prints a
verl-style `step:R - ...` line each time round R completes (the local backend reads its
progress and metrics from those lines). At the end `results.json` holds the metrics over
the first `samples` samples of each problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from runtime.eval import samples as sample_file
from runtime.eval.engine import (
    Completion, Engine, Sampling, TransformersEngine, VllmEngine, model_max_len, pick_engine,
    tensor_parallel_size,
)
from runtime.eval.grader import grade
from runtime import records
from runtime.eval.job import JOB_FILE, PROGRESS_FILE, EvalJob, Progress, Results
from runtime.eval.metrics import dataset_metrics
from runtime.eval.samples import RESULTS_FILE, SAMPLES_FILE, Sample
from runtime.eval.toolloop import Conversation, LoopLimits, ToolLoop
from runtime.verl.recipe import ENV_SANDBOX_URL

log = logging.getLogger("retool.eval")


class Problem:
    def __init__(self, messages: list[dict[str, Any]], ground_truth: str, data_source: str) -> None:
        self.messages, self.ground_truth, self.data_source = messages, ground_truth, data_source


def tools_url(job: EvalJob) -> str:
    """The sandbox the code tool calls: the URL the command was given (on Modal, a service
    sandbox's URL with the container's token in it), else the job's (recorded without one)."""
    return os.environ.get(ENV_SANDBOX_URL) or job.sandbox_url


def load_problems(parquet: str) -> list[Problem]:
    """RL rows: `prompt` messages, `reward_model.ground_truth`, `data_source`."""
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet, columns=["prompt", "reward_model", "data_source"]).to_pylist()
    return [
        Problem(
            messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]],
            ground_truth=str((row.get("reward_model") or {}).get("ground_truth", "")),
            data_source=str(row.get("data_source") or ""),
        )
        for row in rows
    ]


class CountingEngine:
    """Counts generated tokens and generation time (tokens per second in results.json)."""

    def __init__(self, inner: Engine) -> None:
        self.inner, self.name = inner, inner.name
        self.tokens, self.seconds = 0, 0.0

    def generate(self, prompts: Any, max_tokens: Any) -> list[Completion]:
        start = time.perf_counter()
        out = self.inner.generate(prompts, max_tokens)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(c.token_ids) for c in out)
        return out


def build_engine(job: EvalJob) -> Engine:
    sampling = Sampling(temperature=job.temperature, top_p=job.top_p, seed=job.seed)
    name = pick_engine(job.engine, gpus=job.gpus)
    if name == "vllm":
        tp = tensor_parallel_size(job.model_dir, job.gpus)
        if tp < job.gpus:
            log.warning("eval %s: the model's attention heads split %d ways at most: vLLM uses %d of %d GPUs "
                        "(lower the stage's gpus_per_node to %d to pay for no idle GPU)", job.stage, tp, tp, job.gpus, tp)
        return VllmEngine(
            job.model_dir, sampling, tensor_parallel_size=tp, gpu_memory_utilization=job.gpu_memory_utilization,
            max_model_len=model_max_len(job.model_dir, job.max_prompt_length + job.max_response_length),
        )
    return TransformersEngine(job.model_dir, sampling, batch_size=job.batch_size, device=job.device)


def run(job: EvalJob, engine: Engine | None = None, tokenizer: Any = None) -> Results:
    from transformers import AutoTokenizer

    from runtime.data.retool_sft import TOOLS
    from runtime.eval.tools import SandboxTools
    from runtime.verl.recipe.sandbox_call import SandboxCallSettings

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = {name: load_problems(path) for name, path in job.datasets.items()}
    counts = {name: len(items) for name, items in problems.items()}
    path = out / SAMPLES_FILE
    have = [s for s in sample_file.read(path) if s.dataset in counts and s.problem < counts[s.dataset]]
    todo = sample_file.missing(have, counts, job.samples)
    rounds = sample_file.complete_rounds(have, counts)
    log.info(
        "eval %s: %d problems in %s; %d samples per problem; %d already drawn (%d complete rounds); drawing %d",
        job.stage, sum(counts.values()), ", ".join(counts), job.samples, len(have), rounds, len(todo),
    )
    records.save(out / PROGRESS_FILE, Progress(problems=counts, rounds=rounds, drawn=len(have), target=job.samples))
    counting = CountingEngine(engine or build_engine(job))
    tok = tokenizer or AutoTokenizer.from_pretrained(job.model_dir)
    tools = SandboxTools(SandboxCallSettings(
        sandbox_url=tools_url(job), timeout_s=job.tool_timeout_s, memory_limit_mb=job.tool_memory_limit_mb,
        rate_limit=job.tool_rate_limit, num_workers=job.tool_num_workers,
    ), lenient_fences=job.lenient_fences)
    limits = LoopLimits(
        max_prompt_length=job.max_prompt_length, max_response_length=job.max_response_length,
        max_assistant_turns=job.max_assistant_turns, max_user_turns=job.max_user_turns,
        max_tool_response_length=job.max_tool_response_length,
    )
    loop = ToolLoop(tok, counting, TOOLS, limits, tools)
    # vLLM batches internally: hand it a whole round at once; the transformers engine gets
    # a batch of its own size per wave.
    chunk = job.batch_size if counting.name == "transformers" else max(job.batch_size, 1024)
    for start in range(0, len(todo), chunk):
        keys = todo[start:start + chunk]
        convs = [loop.start(problems[d][p].messages) for d, p, _ in keys]
        loop.run(convs)
        drawn = [_graded(loop, conv, key, problems, reward_options(job)) for conv, key in zip(convs, keys)]
        sample_file.append(path, drawn)
        have += drawn
        for s in drawn:
            log.info(
                "drew %s problem %d sample %d: answer %s (%s), %d tool call(s), %d tokens%s",
                s.dataset, s.problem, s.sample, s.answer, "correct" if s.correct else "wrong", s.tool_calls,
                s.response_tokens, ", truncated" if s.truncated else "",
            )
        now = sample_file.complete_rounds(have, counts)
        for r in range(rounds + 1, now + 1):
            _round_line(r, have, counts, counting)
        rounds = now
        records.save(out / PROGRESS_FILE, Progress(problems=counts, rounds=rounds, drawn=len(have), target=job.samples))
    results = Results(
        stage=job.stage, model=job.model_dir, samples=job.samples, engine=counting.name,
        datasets={d: dataset_metrics(d, have, job.samples) for d in counts},
        generated_tokens=counting.tokens, generation_s=round(counting.seconds, 3),
        tokens_per_s=round(counting.tokens / counting.seconds, 1) if counting.seconds > 0 else None,
        device=getattr(counting.inner, "device", "cuda" if counting.name == "vllm" else ""),
    )
    records.save(out / RESULTS_FILE, results)
    log.info("sandbox calls %d (%d without an answer)", tools.calls, tools.sandbox_errors)
    log.info("generated %d tokens in %.1f s (%s tokens/s)", results.generated_tokens, results.generation_s, results.tokens_per_s)
    for d, m in results.datasets.items():
        log.info(
            "%s: mean@%d %.4f · %s · maj@%d %.4f · tool calls %.2f · response %.1f tokens · truncated %.2f",
            d, job.samples, m.mean_at_n, " · ".join(f"pass@{k} {v:.4f}" for k, v in m.pass_at_k.items()),
            job.samples, m.maj_at_n, m.mean_tool_calls, m.mean_response_tokens, m.truncated_share,
        )
    return results


def reward_options(job: EvalJob) -> dict[str, Any]:
    """The reward's keyword options RL passes (runtime.verl.rl): none when the recipe's own."""
    if not job.strip_answer and job.answer_window == EvalJob.model_fields["answer_window"].default:
        return {}
    return {"answer_window": job.answer_window, "strip_answer": job.strip_answer}


def _graded(
    loop: ToolLoop, conv: Conversation, key: tuple[str, int, int], problems: dict[str, list[Problem]],
    options: dict[str, Any],
) -> Sample:
    dataset, index, k = key
    problem = problems[dataset][index]
    text = loop.response_text(conv)
    verdict = grade(problem.data_source or dataset, text, problem.ground_truth, conv.num_turns, options=options)
    return Sample(
        dataset=dataset, problem=index, sample=k, response=text, answer=verdict.answer,
        ground_truth=problem.ground_truth, correct=verdict.correct, score=verdict.score,
        tool_calls=conv.user_turns, turns=conv.num_turns,
        response_tokens=min(len(conv.response_ids), loop.limits.max_response_length), truncated=conv.truncated,
    )


def _round_line(r: int, have: list[Sample], counts: dict[str, int], counting: CountingEngine) -> None:
    """`step:r - eval/<dataset>/mean@n:… - …`: metrics over the first r samples of each problem."""
    parts = [f"step:{r}"]
    for d in counts:
        m = dataset_metrics(d, have, r)
        parts += [f"eval/{d}/mean@n:{m.mean_at_n:.6g}", f"eval/{d}/maj@n:{m.maj_at_n:.6g}"]
        parts += [f"eval/{d}/pass@{k}:{v:.6g}" for k, v in m.pass_at_k.items()]
        parts += [f"eval/{d}/tool_calls:{m.mean_tool_calls:.6g}", f"eval/{d}/response_length:{m.mean_response_tokens:.6g}"]
    if counting.seconds > 0:
        parts.append(f"eval/tokens_per_s:{counting.tokens / counting.seconds:.6g}")
    print(" - ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.eval.run", description=__doc__.splitlines()[0])
    parser.add_argument("job", help=f"the job file ({JOB_FILE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per sandbox call drowns the draws
    job = EvalJob.model_validate_json(Path(args.job).read_text(encoding="utf-8"))
    run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
