"""Evaluation stages (`kind: eval`): sample a model on math problems with the code
interpreter, grade with the recipe's scorer, keep every sample, report pass@k.

- `runtime.eval.samples`   one graded sample; the append-only `samples.jsonl`
- `runtime.eval.metrics`   mean@n, unbiased pass@k, maj@n, tool calls, length, truncation
- `runtime.eval.grader`    the recipe's `compute_score`, called as verl's reward manager does
- `runtime.eval.toolloop`  RL's multi-turn hermes tool loop (verl's ToolAgentLoop, turn by turn)
- `runtime.eval.tools`     the recipe's code_interpreter through the spec's sandbox
- `runtime.eval.engine`    generation: RL's transformers engine (CPU/CUDA) or vLLM (Modal GPUs)
- `runtime.eval.job`       the job a backend hands the runner, progress.json, results.json
- `runtime.eval.run`       `python -m runtime.eval.run JOB`: incremental, resumable runner
- `runtime.eval.discover`  an eval run's "checkpoint": its complete sample rounds

Nothing here imports verl.
"""
