"""The spec: one YAML document that declares a whole ReTool training pipeline.

Every field declares its change policy next to its definition (docs/change-policy.md,
"The three policies"):

- ``restart``: the result would differ -> rerun from scratch;
- ``resume``: the run can continue from its latest valid checkpoint;
- ``update``: applied without rerunning.

`F(...)` is `pydantic.Field` plus a mandatory ``policy``; the policy lands in the JSON
Schema as ``x-policy`` and `field_policy()` reads it back. A test walks the whole schema
and fails on any field without one. Defaults are the recipe's values (docs/recipe.md, "Hyper-parameters").
"""

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from reconciler.builtins import (
    DATASET_BUILTINS, MODEL_BUILTINS, ProblemSet, check_builtin_name, check_generator_format, check_options,
)

Policy = Literal["restart", "resume", "update"]
POLICIES: tuple[str, ...] = ("restart", "resume", "update")

# Modal's GPU type names (validated here because Modal only checks them on its servers).
GPU_TYPES: tuple[str, ...] = (
    "T4", "L4", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H100!", "H200", "B200",
)
GpuType = Literal["T4", "L4", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H100!", "H200", "B200"]

NAME_RE = r"^[a-z][a-z0-9_-]{0,62}$"
SOURCE_RE = re.compile(r"^(hf|path|builtin):(.+)$")


def F(default: Any = ..., *, policy: Policy, description: str, **kwargs: Any) -> Any:
    """A spec field with its change policy declared beside it."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["x-policy"] = policy
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class SpecModel(BaseModel):
    """Strict base: unknown keys are errors (the loader adds a did-you-mean).

    Built at import, unlike the other layers' models (`defer_build`): every command builds the
    whole spec anyway, and a deferred nested model would be built twice, inline in `Spec`'s
    schema and again on its own for `model_dump` (bench/plan_bench.py measured it slower)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def field_policy(model: type[BaseModel], name: str) -> Policy | None:
    """The change policy declared for `model.name`, or None if it has none."""
    info = model.model_fields[name]
    extra = info.json_schema_extra
    if isinstance(extra, dict):
        policy = extra.get("x-policy")
        if policy in POLICIES:
            return policy  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- top level


class StateSettings(SpecModel):
    store: Literal["local", "modal", "ray"] = F(
        "local", policy="update",
        description="Where state lives: a local JSON file, a file on a Modal Volume (teams and CI), or a file in "
                    "the Ray cluster's shared storage (`ray.storage`; the default with `backend: ray`).",
    )
    path: str | None = F(
        None, policy="update",
        description="Local store directory; default `.retool/` beside the spec's repository root.",
    )
    volume: str = F(
        "retool-state", policy="update", description="Modal store: name of the Volume holding the state file."
    )
    lock_dict: str = F(
        "retool-locks", policy="update", description="Modal store: name of the Modal Dict used for the apply lock."
    )
    key: str | None = F(
        None, policy="update", description="State key inside the store; default the spec's `name`."
    )


class LocalSettings(SpecModel):
    root: str | None = F(
        None, policy="update",
        description="Directory holding local volumes (one folder each); default `<state dir>/volumes`.",
    )


class ModalSettings(SpecModel):
    app_name: str | None = F(None, policy="update", description="Modal app name; default `retool-<spec name>`.")
    environment: str | None = F(None, policy="update", description="Modal environment name; default the profile's.")
    efa: Literal["auto", "on", "off"] = F(
        "auto", policy="update",
        description="EFA networking for clustered (multi-node) stages: `experimental_options={'efa_enabled': True}` "
                    "plus the libraries it needs in the image. auto: on for H100 clusters, as Modal's multi-node "
                    "guide sets it (it unlocks extra H100 cluster capacity).",
    )


class RaySettings(SpecModel):
    address: str | None = F(
        None, policy="update",
        description="The cluster's Jobs API address (its dashboard, e.g. `http://head:8265`); default `RAY_ADDRESS`.",
    )
    storage: str | None = F(
        None, policy="update",
        description="A directory every Ray node and this machine mount at the same path (NFS, Lustre, a KubeRay "
                    "shared volume): volumes are folders under it, and the `ray` state store and its lock live there.",
    )
    ship_code: bool = F(
        True, policy="update",
        description="Ship retool's packages to the jobs as `runtime_env.py_modules`; false when the nodes' "
                    "image already has retool installed (a pre-built KubeRay image).",
    )
    pip: list[str] = F(
        default_factory=list, policy="update",
        description="Extra `runtime_env.pip` requirements installed for the jobs (Ray caches the environment).",
    )
    env: dict[str, str] = F(
        default_factory=dict, policy="update", description="Extra `runtime_env.env_vars` for the jobs.",
    )


class Pricing(SpecModel):
    gpu_hour_usd: dict[str, float] = F(
        default_factory=lambda: {
            "H100": 3.95, "H100!": 3.95, "H200": 4.54, "A100-80GB": 2.50, "A100": 2.10,
            "A100-40GB": 2.10, "L40S": 1.95, "A10G": 1.10, "L4": 0.80, "T4": 0.59, "B200": 6.25,
        },
        policy="update",
        description="Dollars per GPU-hour by GPU type (Modal's list price, H100 ~$0.001097/GPU-s).",
    )
    cpu_hour_usd: float = F(0.0, policy="update", ge=0, description="Dollars per hour of a CPU-only run.")


class BudgetLimit(SpecModel):
    """A spending cap: dollars, GPU-hours, or both. Caps change nothing about any run, so
    every field is `update` (docs/budget.md)."""

    usd: float | None = F(None, policy="update", gt=0, description="Dollars (at the `pricing` table's rates).")
    gpu_hours: float | None = F(None, policy="update", gt=0, description="GPU-hours (GPUs x wall hours).")

    @model_validator(mode="after")
    def _some_cap(self) -> "BudgetLimit":
        if self.usd is None and self.gpu_hours is None:
            raise ValueError("a budget needs `usd`, `gpu_hours` or both")
        return self


class Budget(SpecModel):
    """The spend guard: what the whole spec, and optionally each stage, may cost in total
    (measured spend so far plus the plan's estimate). `retool plan` marks what would exceed
    it; `retool apply` refuses that unless `--approve-cost` names the plan's amount."""

    usd: float | None = F(None, policy="update", gt=0, description="Dollars the whole spec may cost in total.")
    gpu_hours: float | None = F(None, policy="update", gt=0, description="GPU-hours the whole spec may use in total.")
    stages: dict[str, BudgetLimit] = F(
        default_factory=dict, policy="update", description="Per-stage caps by stage name (`stages.<name>`).",
    )

    @model_validator(mode="after")
    def _some_cap(self) -> "Budget":
        if self.usd is None and self.gpu_hours is None and not self.stages:
            raise ValueError("a budget needs `usd`, `gpu_hours` or per-stage caps in `stages`")
        return self


class SecretRef(SpecModel):
    """A reference to a secret. Its value never enters the spec, state, plan or logs."""

    modal_name: str | None = F(
        None, policy="update", description="Name of the `modal.Secret` holding it; default the secret's key."
    )
    env: list[str] = F(
        ..., policy="update", min_length=1,
        description="Environment variable names the secret provides (read from the environment locally).",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", n):
                raise ValueError(f"{n!r} is not an environment variable name (A-Z, 0-9, _)")
        return names


class Volume(SpecModel):
    mount: str = F(..., policy="update", description="Absolute mount path inside containers, e.g. `/data`.")
    protect: bool = F(
        False, policy="update", description="A protected volume is never deleted or re-created by retool."
    )

    @field_validator("mount")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("mount must be an absolute path")
        return v.rstrip("/") or "/"


class Image(SpecModel):
    """The container image (Modal) / environment description (local). A change rebuilds it
    but does not by itself rerun a finished stage."""

    base: str = F(
        "nvidia/cuda:12.8.1-devel-ubuntu22.04", policy="update",
        description="Base registry image; pin a tag or digest (plan warns on mutable tags).",
    )
    python: str = F("3.12", policy="update", description="Python version added to the base image.")
    apt: list[str] = F(default_factory=list, policy="update", description="Debian packages.")
    pip: list[str] = F(
        default_factory=lambda: ["verl[vllm]==0.9.1"], policy="update", description="pip requirements, pinned."
    )
    installer: Literal["pip", "uv"] = F("uv", policy="update", description="Install with `pip` or `uv pip`.")
    env: dict[str, str] = F(
        default_factory=dict, policy="update", description="Non-secret environment variables baked into the image."
    )
    commands: list[str] = F(default_factory=list, policy="update", description="Extra shell commands, run in order.")
    local_sources: list[str] = F(
        default_factory=lambda: ["reconciler", "runtime", "sandbox"], policy="update",
        description="Local Python packages added last (Modal's add_local_python_source).",
    )


class Sandbox(SpecModel):
    """The code-execution service the RL stage's tool calls."""

    placement: Literal["sidecar", "service"] = F(
        "sidecar", policy="update",
        description="`sidecar`: on localhost inside the RL container; `service`: a separate endpoint (token-protected).",
    )
    workers: int | None = F(
        None, policy="update", ge=1, description="Executor pool size; default the machine's CPU count."
    )
    max_queue: int = F(256, policy="update", ge=1, description="Requests allowed to wait for a worker before 503.")
    preload: list[str] = F(
        default_factory=lambda: ["numpy", "sympy"], policy="update",
        description="Modules imported once by the pre-warmed interpreter.",
    )
    memory_limit_mb: int = F(1024, policy="update", ge=64, description="Default per-execution memory limit.")
    max_output_bytes: int = F(
        65536, policy="update", ge=1024, description="Per-stream output cap; longer output is cut with a marker."
    )
    replicas: int = F(1, policy="update", ge=1, description="Service replicas (placement `service`).")
    cpu: float = F(8.0, policy="update", gt=0, description="CPU cores for the service container.")
    memory_mb: int = F(16384, policy="update", ge=256, description="Memory for the service container.")
    port: int | None = F(
        None, policy="update", ge=1, le=65535, description="Local port; default a free port."
    )
    token_secret: str | None = F(
        None, policy="update", description="Secret (key in `secrets`) holding the service's bearer token."
    )


# --------------------------------------------------------------------------- data and models


# What retool's preparation writes for a format, by revision: a bump re-prepares every dataset
# of that format (and reruns what consumed it), so data rendered by older code (another tool
# schema, other fences) never meets a newer RL stage. 1, the first, is implied. The SFT formats
# embed the tool schema the model is trained on; 2: the recipe's schema (issue 10); retool_sft 3:
# the recipe's fence rule (only a ```python fence unwrapped; `lenient_fences` for more). The RL
# formats 2: the ground truth is `str(answer)`, unstripped, as the recipe writes it.
# tests/runtime/data/test_preparation_revisions.py pins what each revision writes.
PREPARATION_REVISIONS: dict[str, int] = {
    "retool_sft": 3, "messages": 2, "dapo_math": 2, "aime_2024": 2, "aime_2025": 2, "rl": 2,
}


class Dataset(SpecModel):
    source: str = F(
        ..., policy="restart",
        description="`hf:<repo id>`, `path:<file or dir>` (parquet/jsonl, relative to the spec) or "
        f"`builtin:<generator>` ({', '.join(DATASET_BUILTINS)}).",
    )
    format: Literal["retool_sft", "messages", "dapo_math", "aime_2024", "aime_2025", "rl"] = F(
        ..., policy="restart",
        description="How rows are mapped: ReTool-SFT text -> messages+tools, or a math set -> verl RL rows.",
    )
    split: str = F("train", policy="restart", description="Split to read (Hugging Face sources).")
    revision: str | None = F(None, policy="restart", description="Hugging Face revision (commit, tag).")
    max_rows: int | None = F(None, policy="restart", ge=1, description="Keep only the first N rows.")
    options: dict[str, Any] = F(
        default_factory=dict, policy="restart",
        description="Builtin generator options (rows, seed, problems, heldout; docs/spec.md), checked when the spec "
        "loads; other sources take none.",
    )
    volume: str = F("data", policy="restart", description="Volume the prepared parquet is written to.")
    expected_rows: int | None = F(
        None, policy="update", ge=1, description="Row count used for estimates before the data exists."
    )
    lenient_fences: bool = F(
        False, policy="restart",
        description="Format retool_sft: unwrap the first ```python, ```py or bare ``` fence of each <code> block and "
        "strip the code (the recipe unwraps and strips only a ```python block and keeps other code verbatim).",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        source = _check_source(v, ("hf", "path", "builtin"))
        check_builtin_name("datasets", source)
        return source

    @field_validator("format")
    @classmethod
    def _builtin_format(cls, fmt: str, info: ValidationInfo) -> str:
        check_generator_format(info.data.get("source"), fmt)
        return fmt

    @field_validator("options")
    @classmethod
    def _builtin_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "source" in info.data:  # else the source's own error is reported
            check_options("datasets", info.data["source"], options)
        return options

    @model_validator(mode="after")
    def _lenient_fences_for_retool_sft(self) -> "Dataset":
        if self.lenient_fences and self.format != "retool_sft":
            raise ValueError(f"lenient_fences applies to format retool_sft only (this dataset's format is {self.format})")
        return self


class Model(SpecModel):
    source: str = F(
        ..., policy="restart",
        description=f"`hf:<repo id>`, `path:<HF model dir>` or `builtin:<model>` ({', '.join(MODEL_BUILTINS)}).",
    )
    revision: str | None = F(None, policy="restart", description="Hugging Face revision (commit, tag).")
    options: dict[str, Any] = F(
        default_factory=dict, policy="restart",
        description="Builtin model options (seed, hidden_size, layers, ...; docs/spec.md), checked when the spec "
        "loads; other sources take none.",
    )
    volume: str = F("models", policy="restart", description="Volume the model is stored in.")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        source = _check_source(v, ("hf", "path", "builtin"))
        check_builtin_name("models", source)
        return source

    @field_validator("options")
    @classmethod
    def _builtin_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "source" in info.data:  # else the source's own error is reported
            check_options("models", info.data["source"], options)
        return options


def _check_source(v: str, kinds: tuple[str, ...]) -> str:
    m = SOURCE_RE.match(v.strip())
    if not m or m.group(1) not in kinds:
        raise ValueError(f"source must start with one of {', '.join(k + ':' for k in kinds)} (got {v!r})")
    return f"{m.group(1)}:{m.group(2).strip()}"


# --------------------------------------------------------------------------- stages


class Resources(SpecModel):
    gpu: GpuType | None = F(
        None, policy="update", description="GPU type (Modal names); null runs on CPU."
    )
    gpu_fallbacks: list[GpuType] = F(
        default_factory=list, policy="update", description="Other GPU types Modal may use, in order."
    )
    gpus_per_node: int = F(
        0, policy="restart", ge=0, le=8, description="GPUs per node; part of the checkpoint's world size."
    )
    nodes: int = F(1, policy="restart", ge=1, le=64, description="Nodes (Modal `clustered`); part of the world size.")
    processes_per_node: int | None = F(
        None, policy="restart", ge=1, le=256,
        description="Trainer processes per node; default gpus_per_node (1 on CPU). Part of the world size.",
    )
    cpu: float | None = F(None, policy="update", gt=0, description="CPU cores requested.")
    memory_mb: int | None = F(None, policy="update", ge=256, description="Memory requested, MiB.")
    timeout_hours: float = F(
        24.0, policy="update", gt=0, description="Per-attempt limit; longer stages run as segments (Modal caps 24 h)."
    )
    retries: int = F(2, policy="update", ge=0, le=10, description="Retries after preemption or crash.")

    @model_validator(mode="after")
    def _gpu_consistent(self) -> "Resources":
        if self.gpu is None and self.gpus_per_node:
            raise ValueError("gpus_per_node > 0 needs a gpu type")
        if self.gpu is not None and self.gpus_per_node == 0:
            raise ValueError("gpu is set but gpus_per_node is 0")
        return self

    @property
    def world_size(self) -> int:
        per_node = self.processes_per_node or self.gpus_per_node or 1
        return per_node * self.nodes


class Optim(SpecModel):
    lr: float = F(1e-5, policy="restart", gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = F((0.9, 0.95), policy="restart", description="AdamW betas.")
    weight_decay: float = F(0.01, policy="restart", ge=0, description="AdamW weight decay.")
    warmup_ratio: float = F(0.1, policy="restart", ge=0, le=1, description="Warm-up fraction of total steps.")
    lr_scheduler: Literal["cosine", "constant"] = F("cosine", policy="restart", description="Schedule after warm-up.")
    clip_grad: float = F(1.0, policy="restart", gt=0, description="Gradient-norm clip.")


class ActorOptim(Optim):
    """RL actor optimizer: the recipe's defaults (constant lr 1e-6, AdamW betas 0.9/0.999)."""

    lr: float = F(1e-6, policy="restart", gt=0, description="Actor learning rate.")
    betas: tuple[float, float] = F((0.9, 0.999), policy="restart", description="AdamW betas.")
    warmup_ratio: float = F(0.0, policy="restart", ge=0, le=1, description="Warm-up fraction of total steps.")
    lr_scheduler: Literal["cosine", "constant"] = F("constant", policy="restart", description="Schedule after warm-up.")


class Logging(SpecModel):
    backends: list[Literal["console", "wandb", "tensorboard", "file"]] = F(
        default_factory=lambda: ["console"], policy="update", description="Trainer loggers."
    )
    project: str = F("retool", policy="update", description="Project name (W&B project).")
    experiment: str | None = F(None, policy="update", description="Experiment/run name; default `<spec>-<stage>`.")


class Expectation(SpecModel):
    """What a stage should reach on one metric, and where that number comes from.

    `retool status` compares it with the latest value of `metric` the run reported (for
    validation metrics: once validation ran). Used by training stages (`expect:`) and eval
    stages alike; it changes nothing about the run, so every field is `update`."""

    metric: str = F(
        ..., policy="update", min_length=1,
        description="Metric key as the trainer logs it, e.g. `val-core/aime_2024/acc/mean@30`.",
    )
    at_least: float | None = F(None, policy="update", description="Met when the reached value is at least this.")
    at_most: float | None = F(None, policy="update", description="Met when the reached value is at most this.")
    at_step: int | None = F(
        None, policy="update", ge=0, description="Step at which the source reported the number (shown, not enforced)."
    )
    source: str = F(
        ..., policy="update", min_length=1,
        description="Where the number comes from (paper, README, table), so a reader can check it.",
    )

    @model_validator(mode="after")
    def _bound(self) -> "Expectation":
        if self.at_least is None and self.at_most is None:
            raise ValueError("an expectation needs `at_least` or `at_most`")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError(f"at_least {self.at_least} is above at_most {self.at_most}")
        return self

    def met_by(self, value: float) -> bool:
        """Whether `value` satisfies the bound(s)."""
        low = self.at_least is None or value >= self.at_least
        high = self.at_most is None or value <= self.at_most
        return low and high

    def bound_text(self) -> str:
        """`>= 0.4`, `<= 2`, or `0.4..0.6`."""
        if self.at_least is not None and self.at_most is not None:
            return f"{self.at_least:g}..{self.at_most:g}"
        if self.at_least is not None:
            return f">= {self.at_least:g}"
        return f"<= {self.at_most:g}"


class StepTimeBasis(SpecModel):
    """Where a stage's `seconds_per_step` comes from and how far off it may be: `retool plan`
    prints it beside the stage's cost. It changes nothing about the run, so every field is
    `update`."""

    source: Literal["measured", "derived", "guess"] = F(
        ..., policy="update",
        description="`measured`: timed on the hardware `detail` names; `derived`: computed from measured parts "
        "with a stated model (e.g. `python bench/step_costs.py`); `guess`: neither.",
    )
    detail: str = F(
        ..., policy="update", min_length=1,
        description="What it was measured on or derived from (command, hardware, date), so a reader can redo it.",
    )
    low: float | None = F(None, policy="update", gt=0, description="Lowest plausible seconds per step.")
    high: float | None = F(None, policy="update", gt=0, description="Highest plausible seconds per step.")

    @model_validator(mode="after")
    def _range(self) -> "StepTimeBasis":
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        return self


def _check_step_time(seconds: float | None, basis: StepTimeBasis | None) -> None:
    """A basis describes a `seconds_per_step`, which must lie within its range."""
    if basis is None:
        return
    if seconds is None:
        raise ValueError("seconds_per_step_basis describes a seconds_per_step, but none is set")
    if basis.low is not None and seconds < basis.low:
        raise ValueError(f"seconds_per_step {seconds:g} is below seconds_per_step_basis.low {basis.low:g}")
    if basis.high is not None and seconds > basis.high:
        raise ValueError(f"seconds_per_step {seconds:g} is above seconds_per_step_basis.high {basis.high:g}")


BASIS_DESCRIPTION = "Where seconds_per_step comes from (measured, derived, guess) and its plausible range."


class StageCommon(SpecModel):
    model: str = F(
        ..., policy="restart", description="Initial weights: `model.<name>` or an upstream `stage.<name>`."
    )
    train: str = F(..., policy="restart", description="Training data: `dataset.<name>`.")
    volume: str = F("checkpoints", policy="restart", description="Volume holding this stage's checkpoints.")
    resources: Resources = F(default_factory=Resources, policy="restart", description="Compute for this stage.")
    seed: int = F(42, policy="restart", description="Random seed.")
    max_steps: int | None = F(
        None, policy="resume", ge=1, description="Cap on optimizer steps (total_training_steps)."
    )
    save_freq: int = F(20, policy="update", ge=1, description="Checkpoint every N steps (and at the end).")
    test_freq: int = F(10, policy="update", ge=1, description="Validate every N steps.")
    max_ckpt_to_keep: int | None = F(None, policy="update", ge=1, description="Older checkpoints are pruned.")
    logging: Logging = F(default_factory=Logging, policy="update", description="Loggers and names.")
    secrets: list[str] = F(default_factory=list, policy="update", description="Keys of `secrets` this stage needs.")
    env: dict[str, str] = F(default_factory=dict, policy="update", description="Extra non-secret environment.")
    overrides: list[str] = F(
        default_factory=list, policy="restart",
        description="Raw verl hydra overrides (`key=value`, `+key=value`), applied last.",
    )
    seconds_per_step: float | None = F(
        None, policy="update", gt=0, description="Estimate used until a recorded run measured it."
    )
    seconds_per_step_basis: StepTimeBasis | None = F(None, policy="update", description=BASIS_DESCRIPTION)
    expect: list[Expectation] = F(
        default_factory=list, policy="update",
        description="What the stage should reach (metric, bound, source); `retool status` shows expected vs reached.",
    )

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, items: list[str]) -> list[str]:
        for item in items:
            if not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.\-]*(=.*)?", item) or ("=" not in item and not item.startswith("~")):
                raise ValueError(f"override {item!r} is not `key=value`, `+key=value` or `~key`")
        return items

    @model_validator(mode="after")
    def _step_time(self) -> "StageCommon":
        _check_step_time(self.seconds_per_step, self.seconds_per_step_basis)
        return self


class ToolCallCheck(SpecModel):
    prompts: int = F(50, policy="update", ge=1, description="Held-out prompts decoded greedily after training.")
    problems: ProblemSet = F(
        "mixed", policy="update",
        description="The builtin problem set the prompts come from: the one the SFT data was generated from.",
    )
    min_rate: float = F(
        0.8, policy="update", ge=0, le=1, description="Required fraction that emit a well-formed tool call."
    )


class SFTStage(StageCommon):
    kind: Literal["sft"] = F("sft", policy="restart", description="Supervised fine-tuning (verl sft_trainer).")
    val: str | None = F(None, policy="restart", description="Validation data: `dataset.<name>`.")
    epochs: int = F(6, policy="resume", ge=1, description="Passes over the data.")
    max_length: int = F(16384, policy="restart", ge=16, description="Maximum tokens per sample.")
    truncation: Literal["error", "left", "right"] = F("error", policy="restart", description="Over-long samples.")
    train_batch_size: int = F(32, policy="restart", ge=1, description="Global batch size.")
    micro_batch_size_per_gpu: int = F(4, policy="restart", ge=1, description="Micro batch per device.")
    optim: Optim = F(default_factory=Optim, policy="restart", description="Optimizer.")
    ulysses_sequence_parallel_size: int = F(4, policy="restart", ge=1, description="Ulysses sequence parallelism.")
    use_remove_padding: bool = F(True, policy="restart", description="Remove padding (packed sequences).")
    gradient_checkpointing: bool = F(True, policy="update", description="Trade compute for memory.")
    save_freq: int = F(62, policy="update", ge=1, description="Checkpoint every N steps (and at the end).")
    tool_call_check: ToolCallCheck | None = F(
        None, policy="update", description="After training, measure how often the merged model emits a tool call."
    )

    @model_validator(mode="after")
    def _batch(self) -> "SFTStage":
        if self.train_batch_size % (self.resources.world_size or 1):
            raise ValueError(
                f"train_batch_size {self.train_batch_size} is not divisible by the world size {self.resources.world_size}"
            )
        return self


class Algorithm(SpecModel):
    adv_estimator: Literal["grpo", "gae", "rloo", "reinforce_plus_plus"] = F(
        "grpo", policy="restart", description="Advantage estimator."
    )
    use_kl_in_reward: bool = F(False, policy="restart", description="KL penalty in the reward.")
    use_kl_loss: bool = F(False, policy="restart", description="KL loss term in the actor.")
    clip_ratio_low: float = F(0.2, policy="restart", ge=0, description="PPO clip, lower (clip-higher: 0.2).")
    clip_ratio_high: float = F(0.28, policy="restart", ge=0, description="PPO clip, upper (clip-higher: 0.28).")
    clip_ratio_c: float = F(10.0, policy="restart", gt=1, description="Dual-clip constant.")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = F(
        "token-mean", policy="restart", description="Loss aggregation."
    )
    kl_coef: float = F(0.0, policy="restart", ge=0, description="KL-in-reward coefficient (recipe: 0, KL off).")
    kl_loss_coef: float = F(0.0, policy="restart", ge=0, description="KL-loss coefficient (recipe: 0, KL off).")
    gamma: float = F(1.0, policy="restart", ge=0, le=1, description="GAE discount (PPO; recipe: 1.0).")
    lam: float = F(1.0, policy="restart", ge=0, le=1, description="GAE lambda (PPO; recipe: 1.0).")


class Critic(SpecModel):
    """The value model PPO trains (`algorithm.adv_estimator: gae`), started from the actor's
    initial weights as in the recipe. Defaults: the recipe's Qwen2.5-32B PPO values."""

    lr: float = F(2e-6, policy="restart", gt=0, description="Critic learning rate.")
    warmup_steps: int = F(
        20, policy="restart", ge=0, description="Steps the critic trains before the actor's first update."
    )
    ppo_max_token_len_per_gpu: int = F(
        73728, policy="restart", ge=1, description="Critic tokens per GPU (recipe: 4 x (prompt + response))."
    )
    ulysses_sequence_parallel_size: int = F(4, policy="restart", ge=1, description="Ulysses sequence parallelism.")
    param_offload: bool = F(True, policy="update", description="FSDP parameter offload.")
    optimizer_offload: bool = F(True, policy="update", description="FSDP optimizer offload.")
    gradient_checkpointing: bool = F(True, policy="update", description="Trade compute for memory.")


class RecipeOptions(SpecModel):
    """Departures from the published ReTool recipe's tool and reward, all off by default
    (docs/fidelity.md, "Differences from the official recipe", lists them)."""

    lenient_fences: bool = F(
        False, policy="restart",
        description="Tool: when the code has no ```python block, also run the first ```py or bare ``` block's body "
        "(the recipe sends such code with its fences).",
    )
    strip_answer: bool = F(
        False, policy="restart",
        description="Reward: ignore whitespace around the \\boxed{} answer and the ground truth (the recipe: "
        "`\\boxed{ 204 }` is wrong).",
    )
    answer_window: int = F(
        100, policy="restart", ge=1,
        description="Reward: the last \\boxed{} is searched in this many final characters (the recipe: 100).",
    )

    @property
    def is_recipe(self) -> bool:
        return self == RecipeOptions()


class Rollout(SpecModel):
    engine: Literal["auto", "vllm", "sglang", "transformers"] = F(
        "auto", policy="update", description="`auto`: vllm on GPU, retool's transformers rollout on CPU."
    )
    n: int = F(16, policy="restart", ge=1, description="Samples per prompt (GRPO group size).")
    temperature: float = F(1.0, policy="restart", ge=0, description="Training sampling temperature.")
    top_p: float = F(1.0, policy="restart", gt=0, le=1, description="Training nucleus sampling.")
    tensor_parallel_size: int = F(4, policy="update", ge=1, description="Rollout tensor parallelism.")
    gpu_memory_utilization: float = F(0.9, policy="update", gt=0, le=1, description="vLLM memory fraction.")
    max_assistant_turns: int = F(16, policy="restart", ge=1, description="Multi-turn cap (assistant turns).")
    max_user_turns: int = F(16, policy="restart", ge=1, description="Multi-turn cap (user/tool turns).")
    format: Literal["hermes"] = F("hermes", policy="restart", description="Tool-call format.")
    max_tool_response_length: int = F(256, policy="restart", ge=1, description="Tool output shown to the model.")
    max_num_seqs: int = F(
        1024, policy="update", ge=1,
        description="Sequences the engine decodes at once (the recipe's: verl 0.6.1's default 1024; verl 0.9.1's is 256).",
    )


class Validation(SpecModel):
    n: int = F(30, policy="update", ge=1, description="Samples per validation prompt.")
    temperature: float = F(1.0, policy="update", ge=0, description="Validation temperature.")
    top_p: float = F(0.6, policy="update", gt=0, le=1, description="Validation nucleus sampling.")
    before_train: bool = F(True, policy="update", description="Validate before the first step.")
    log_generations: int = F(
        20, policy="update", ge=0, description="Validation samples logged as a table (W&B and the like; recipe 7B: 20)."
    )


class ToolSettings(SpecModel):
    timeout_s: float = F(30.0, policy="update", gt=0, le=600, description="Per tool call run timeout.")
    queue_timeout_s: float = F(
        300.0, policy="update", gt=0, le=3600,
        description="Longest a tool call waits for a sandbox worker (not run time); then the model sees the "
        "recipe's sandbox-failure text.",
    )
    memory_limit_mb: int = F(1024, policy="update", ge=64, description="Per tool call memory limit.")
    num_workers: int = F(128, policy="update", ge=1, description="Tool worker count.")
    rate_limit: int = F(128, policy="update", ge=1, description="Concurrent tool calls (a cap, not per second).")


class RLStage(StageCommon):
    kind: Literal["rl"] = F("rl", policy="restart", description="GRPO with clip-higher (verl main_ppo).")
    val: list[str] = F(default_factory=list, policy="restart", description="Validation data: `dataset.<name>` list.")
    epochs: int = F(1, policy="resume", ge=1, description="Passes over the data (cap with max_steps).")
    train_batch_size: int = F(64, policy="restart", ge=1, description="Prompts per step.")
    ppo_mini_batch_size: int = F(16, policy="restart", ge=1, description="Prompts per PPO mini-batch.")
    max_prompt_length: int = F(2048, policy="restart", ge=16, description="Prompt token cap.")
    max_response_length: int = F(16384, policy="restart", ge=16, description="Response token cap (all turns).")
    filter_overlong_prompts: bool = F(True, policy="restart", description="Drop prompts over the cap.")
    truncation: Literal["error", "left", "right"] = F("error", policy="restart", description="Over-long prompts.")
    use_dynamic_bsz: bool = F(True, policy="restart", description="Token-based dynamic batching.")
    ppo_max_token_len_per_gpu: int = F(18432, policy="restart", ge=1, description="Actor tokens per GPU.")
    log_prob_max_token_len_per_gpu: int = F(
        73728, policy="update", ge=1,
        description="Reference-model log-prob tokens per GPU (recipe: 4 x (prompt + response); the reference model "
        "exists only with a KL term). The actor's own log-prob pass uses ppo_max_token_len_per_gpu, as in the recipe.",
    )
    ulysses_sequence_parallel_size: int = F(4, policy="restart", ge=1, description="Ulysses sequence parallelism.")
    param_offload: bool = F(True, policy="update", description="FSDP parameter offload.")
    optimizer_offload: bool = F(True, policy="update", description="FSDP optimizer offload.")
    gradient_checkpointing: bool = F(True, policy="update", description="Trade compute for memory.")
    optim: ActorOptim = F(default_factory=ActorOptim, policy="restart", description="Actor optimizer.")
    algorithm: Algorithm = F(default_factory=Algorithm, policy="restart", description="GRPO / clip-higher.")
    rollout: Rollout = F(default_factory=Rollout, policy="restart", description="Rollout engine and sampling.")
    validation: Validation = F(default_factory=Validation, policy="update", description="Validation sampling.")
    tool: ToolSettings = F(default_factory=ToolSettings, policy="update", description="code_interpreter tool.")
    critic: Critic | None = F(
        None, policy="restart", description="Value model; required by (and only used with) `adv_estimator: gae`."
    )
    recipe: RecipeOptions = F(
        default_factory=RecipeOptions, policy="restart",
        description="Departures from the recipe's tool and reward (all off by default).",
    )

    @model_validator(mode="after")
    def _critic(self) -> "RLStage":
        if self.algorithm.adv_estimator == "gae" and self.critic is None:
            raise ValueError(
                "adv_estimator gae trains a value model: add a `critic:` block (`critic: {}` takes the recipe's "
                "32B PPO values)"
            )
        if self.algorithm.adv_estimator != "gae" and self.critic is not None:
            raise ValueError(f"`critic` is only used with adv_estimator gae, not {self.algorithm.adv_estimator}")
        return self

    @model_validator(mode="after")
    def _batch(self) -> "RLStage":
        if self.ppo_mini_batch_size > self.train_batch_size:
            raise ValueError("ppo_mini_batch_size must not exceed train_batch_size")
        return self


class EvalResources(Resources):
    """Compute for an eval stage: samples do not depend on the GPU count (no checkpoint
    world size), so every field here is `update`."""

    gpus_per_node: int = F(0, policy="update", ge=0, le=8, description="GPUs for generation (vLLM tensor parallel on Modal).")
    nodes: int = F(1, policy="update", ge=1, le=1, description="Always 1: an eval stage runs on one machine.")
    processes_per_node: int | None = F(None, policy="update", ge=1, le=1, description="Always 1 (one generation process).")


class EvalStage(SpecModel):
    """Evaluate a model on math problems with the code interpreter: sample with RL's chat
    template, tool schema and hermes tool loop, grade with the recipe's scorer, record
    mean@n, unbiased pass@k and maj@n per dataset, keep every sample."""

    kind: Literal["eval"] = F("eval", policy="restart", description="Evaluation (samples, grades, pass@k).")
    model: str = F(
        ..., policy="restart",
        description="Model to evaluate: `model.<name>`, or a training `stage.<name>` (its final merged checkpoint).",
    )
    datasets: list[str] = F(
        ..., policy="restart", min_length=1,
        description="Problems: `dataset.<name>` list in RL row format (aime_2024, aime_2025, dapo_math, rl).",
    )
    samples: int = F(
        32, policy="resume", ge=1,
        description="Samples per problem. More resume (samples drawn are kept); fewer is a no-op.",
    )
    temperature: float = F(1.0, policy="restart", ge=0, description="Sampling temperature (recipe validation: 1.0).")
    top_p: float = F(0.6, policy="restart", gt=0, le=1, description="Nucleus sampling (recipe validation: 0.6).")
    max_prompt_length: int = F(2048, policy="restart", ge=16, description="Prompt token cap; longer prompts are left-truncated.")
    max_response_length: int = F(16384, policy="restart", ge=16, description="Response token cap (all turns, tool output included).")
    max_assistant_turns: int = F(16, policy="restart", ge=1, description="Multi-turn cap (assistant turns), as in RL.")
    max_user_turns: int = F(16, policy="restart", ge=1, description="Multi-turn cap (tool turns), as in RL.")
    max_tool_response_length: int = F(256, policy="restart", ge=1, description="Tool output shown to the model (characters).")
    seed: int = F(42, policy="restart", description="Sampling seed.")
    volume: str = F("checkpoints", policy="restart", description="Volume holding samples.jsonl and results.json.")
    engine: Literal["auto", "vllm", "transformers"] = F(
        "auto", policy="update", description="`auto`: vLLM on Modal GPUs, retool's transformers engine elsewhere.",
    )
    batch_size: int = F(64, policy="update", ge=1, description="Conversations decoded together (transformers engine).")
    gpu_memory_utilization: float = F(0.9, policy="update", gt=0, le=1, description="vLLM memory fraction.")
    tool: ToolSettings = F(default_factory=ToolSettings, policy="update", description="code_interpreter tool.")
    recipe: RecipeOptions = F(
        default_factory=RecipeOptions, policy="restart",
        description="Departures from the recipe's tool and reward (all off by default): grade as the RL stage does.",
    )
    expect: list[Expectation] = F(
        default_factory=list, policy="update",
        description="Expected results: `metric` is `<dataset>/<metric>` (e.g. `aime_2024/mean@n`, `aime_2025/pass@16`, "
        "`aime_2024/maj@n`); `retool status` shows them beside the reached values.",
    )
    resources: EvalResources = F(default_factory=EvalResources, policy="update", description="Compute for this stage.")
    secrets: list[str] = F(default_factory=list, policy="update", description="Keys of `secrets` this stage needs.")
    env: dict[str, str] = F(default_factory=dict, policy="update", description="Extra non-secret environment.")
    seconds_per_step: float | None = F(
        None, policy="update", gt=0, description="Estimate of one sample round (one sample per problem), until measured.",
    )
    seconds_per_step_basis: StepTimeBasis | None = F(None, policy="update", description=BASIS_DESCRIPTION)

    @field_validator("datasets")
    @classmethod
    def _distinct(cls, items: list[str]) -> list[str]:
        if len(set(items)) != len(items):
            raise ValueError("datasets are listed more than once")
        return items

    @model_validator(mode="after")
    def _step_time(self) -> "EvalStage":
        _check_step_time(self.seconds_per_step, self.seconds_per_step_basis)
        return self


def _stage_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("kind")
    return getattr(v, "kind", None)


Stage = Annotated[
    Union[Annotated[SFTStage, Tag("sft")], Annotated[RLStage, Tag("rl")], Annotated[EvalStage, Tag("eval")]],
    Discriminator(
        _stage_kind, custom_error_type="stage_kind", custom_error_message="kind must be `sft`, `rl` or `eval`"
    ),
]


class Spec(SpecModel):
    """A ReTool pipeline: volumes, image, sandbox, datasets, models, stages."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, title="retool spec",
        json_schema_extra={"$id": "https://retool.dev/schema/spec.json"},
    )

    name: str = F(..., policy="update", pattern=NAME_RE, description="Pipeline name (state key, Modal app name).")
    backend: Literal["local", "modal", "ray"] = F("local", policy="update", description="Where it runs.")
    state: StateSettings = F(default_factory=StateSettings, policy="update", description="State store.")
    local: LocalSettings = F(default_factory=LocalSettings, policy="update", description="Local backend settings.")
    modal: ModalSettings = F(default_factory=ModalSettings, policy="update", description="Modal backend settings.")
    ray: RaySettings = F(default_factory=RaySettings, policy="update", description="Ray backend settings.")
    pricing: Pricing = F(default_factory=Pricing, policy="update", description="Price table for estimates.")
    budget: Budget | None = F(
        None, policy="update", description="Spend guard: dollar and GPU-hour caps for the spec and its stages.",
    )
    secrets: dict[str, SecretRef] = F(default_factory=dict, policy="update", description="Secret references by key.")
    volumes: dict[str, Volume] = F(default_factory=dict, policy="update", description="Volumes by name.")
    image: Image = F(default_factory=Image, policy="update", description="Container image / environment.")
    sandbox: Sandbox | None = F(None, policy="update", description="Code sandbox (needed by RL stages).")
    datasets: dict[str, Dataset] = F(default_factory=dict, policy="restart", description="Datasets by name.")
    models: dict[str, Model] = F(default_factory=dict, policy="restart", description="Base models by name.")
    stages: dict[str, Stage] = F(default_factory=dict, policy="restart", description="Training stages by name.")

    @field_validator("volumes", "datasets", "models", "stages", "secrets")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.fullmatch(NAME_RE, key):
                raise ValueError(f"name {key!r} must match {NAME_RE} (lower case, digits, _ and -)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _ray_state_default(cls, data: Any) -> Any:
        """On `backend: ray` state lives in the cluster's shared storage unless the spec says
        where: every machine that applies the spec then sees one state and one lock."""
        if isinstance(data, dict) and data.get("backend") == "ray":
            state = data.get("state")
            if state is None or (isinstance(state, dict) and "store" not in state):
                data = {**data, "state": {**(state or {}), "store": "ray"}}
        return data

    @model_validator(mode="after")
    def _ray_storage_set(self) -> "Spec":
        if (self.backend == "ray" or self.state.store == "ray") and not self.ray.storage:
            raise ValueError(
                "ray.storage is required with `backend: ray` or `state.store: ray` "
                "(a directory every Ray node mounts at the same path)"
            )
        if self.ray.storage and not self.ray.storage.startswith(("/", "~")):
            raise ValueError(f"ray.storage must be an absolute path (got {self.ray.storage!r})")
        return self
