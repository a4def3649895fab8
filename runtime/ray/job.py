"""A stage job's entrypoint on the Ray cluster: `python -m runtime.ray.job PLAN.json TAG`.

It runs the plan's commands in order with the local backend's wrapper
(runtime.processes.run_plan: SIGTERM from `ray job stop` reaches the running command, the
exit record lands beside the plan in the shared storage), with `python`/`torchrun` resolved
to this node's interpreter. Every process it starts carries `RETOOL_RUN_TAG=TAG` (one tag
per run directory): trainer processes an earlier attempt of the same run left behind on
this node are stopped before training starts, so two trainers never write the same
checkpoints; and each command runs through runtime.ray.guard, so it gets SIGTERM when this
entrypoint dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from runtime import processes as procs
from runtime import records
from runtime.ray.guard import guarded
from runtime.records import RunPlan


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m runtime.ray.job PLAN.json TAG", file=sys.stderr)
        return 2
    plan_path, tag = Path(argv[0]), argv[1]
    plan = records.parse(RunPlan, plan_path.read_text(encoding="utf-8"), source=str(plan_path))
    leftovers = procs.run_members(None, tag)
    if leftovers:
        print(f"[retool] stopping {len(leftovers)} process(es) an earlier attempt of this run left: {leftovers}", flush=True)
        procs.terminate_run(None, tag, grace_s=10)
    os.environ[procs.RUN_TAG_ENV] = tag
    # Each command dies with this entrypoint (runtime.ray.guard): a killed job leaves no trainer.
    commands = [c.model_copy(update={"argv": guarded(procs.this_interpreter(c.argv))}) for c in plan.commands]
    return procs.run_plan(plan.model_copy(update={"commands": commands}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
