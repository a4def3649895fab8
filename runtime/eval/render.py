"""An eval stage as a job and a command, for any backend (pure: no torch).

The backend says where things are (model directory, dataset files, run directory, sandbox
URL, GPUs); the job carries the stage's sampling and loop settings unchanged, and the
command is `python -m runtime.eval.run <run dir>/job.json`.
"""

from __future__ import annotations

from typing import Literal

from reconciler.backend import RenderedCommand, StageContext
from reconciler.errors import TerminalError
from reconciler.spec import EvalStage
from runtime.eval.job import JOB_FILE, EvalJob
from runtime.verl.common import dataset_file, initial_weights_dir
from runtime.verl.recipe import ENV_SANDBOX_URL


def eval_stage(ctx: StageContext) -> EvalStage:
    stage = ctx.spec.stages.get(ctx.stage)
    if not isinstance(stage, EvalStage):
        raise TerminalError(f"stage.{ctx.stage} is not an eval stage")
    return stage


def eval_job(
    ctx: StageContext, *, out_dir: str, sandbox_url: str, gpus: int, device: Literal["cpu", "cuda"] | None,
) -> EvalJob:
    """The job for `ctx`'s eval stage; `ctx.inputs` holds the model's and datasets' outputs."""
    stage = eval_stage(ctx)
    return EvalJob(
        stage=ctx.stage, model_dir=initial_weights_dir(ctx, stage.model),
        datasets={d.partition(".")[2]: dataset_file(ctx, d) for d in stage.datasets},
        samples=ctx.total_steps or stage.samples, temperature=stage.temperature, top_p=stage.top_p, seed=stage.seed,
        max_prompt_length=stage.max_prompt_length, max_response_length=stage.max_response_length,
        max_assistant_turns=stage.max_assistant_turns, max_user_turns=stage.max_user_turns,
        max_tool_response_length=stage.max_tool_response_length, engine=stage.engine, batch_size=stage.batch_size,
        gpus=gpus, device=device, gpu_memory_utilization=stage.gpu_memory_utilization, sandbox_url=sandbox_url,
        tool_timeout_s=stage.tool.timeout_s, tool_memory_limit_mb=stage.tool.memory_limit_mb,
        tool_rate_limit=stage.tool.rate_limit, tool_num_workers=stage.tool.num_workers, out_dir=out_dir,
        lenient_fences=stage.recipe.lenient_fences, strip_answer=stage.recipe.strip_answer,
        answer_window=stage.recipe.answer_window,
    )


def eval_command(ctx: StageContext, job: EvalJob) -> RenderedCommand:
    """The runner's command; its job file is written into the run directory at launch."""
    stage = eval_stage(ctx)
    env = dict(ctx.spec.image.env)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(stage.env)
    # the tools' URL as the backend gives it: on Modal the container puts a service sandbox's
    # token into it (`<url>/t/<token>`); the job file only records the URL, never the token
    env[ENV_SANDBOX_URL] = job.sandbox_url
    return RenderedCommand(
        argv=["python", "-m", "runtime.eval.run", f"{job.out_dir}/{JOB_FILE}"], env=env,
        description=f"eval: {job.samples} samples per problem of {', '.join(job.datasets)} "
        f"(job written at launch: {job.model_dump_json()})",
    )
