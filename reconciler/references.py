"""Cross-references inside a spec: checked on the raw YAML data, so they are reported
together with schema errors (Terraform collects every diagnostic before reporting).

- `stages.X.model` names an existing `model.Y` or another `stage.Y`;
- `stages.X.train` / `val` name existing `dataset.Y`s;
- every `volume:` names a volume declared in `volumes`;
- every `secrets:` entry (and `sandbox.token_secret`) names a key of `secrets`;
- an eval stage's `datasets` name existing RL-format `dataset.Y`s, and its `model` is not
  another eval stage (an eval produces no model);
- an RL or eval stage needs a `sandbox`;
- stages consuming stages form no cycle;
- `budget.stages` names existing stages.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from reconciler.spec import Dataset, EvalStage, Model, RLStage, SFTStage
from reconciler.suggest import suggest

Path = tuple[str | int, ...]


class RefProblem(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    path: Path
    message: str


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].default


def _ref(value: Any, kinds: tuple[str, ...], names: dict[str, list[str]], what: str) -> str | None:
    """Check one `kind.name` reference; None when valid, else the problem."""
    if not isinstance(value, str):
        return None  # the schema reports the wrong type
    kind, _, name = value.partition(".")
    allowed = " or ".join(f"`{k}.<name>`" for k in kinds)
    if kind not in kinds or not name:
        return f"{what} must be {allowed}, got {value!r}"
    if name not in names[kind]:
        known = ", ".join(f"{kind}.{n}" for n in names[kind]) or "none declared"
        candidates = [f"{k}.{n}" for k in kinds for n in names[k]]  # `model.sft` may mean `stage.sft`
        return f"unknown reference {value!r} ({kind}s: {known}){suggest(value, candidates)}"
    return None


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path `[a, b, a]`, or None. Deterministic (sorted walk)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, [])):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def check_references(data: Any) -> list[RefProblem]:
    """Every broken reference in the raw spec data (wrong types are left to the schema)."""
    if not isinstance(data, dict):
        return []
    problems: list[RefProblem] = []
    datasets, models, stages = _section(data, "datasets"), _section(data, "models"), _section(data, "stages")
    volumes, secrets = _section(data, "volumes"), _section(data, "secrets")
    names = {"dataset": list(datasets), "model": list(models), "stage": list(stages)}

    def volume_ref(section: str, name: str, body: dict[str, Any], default: str) -> None:
        path: Path = (section, name, "volume") if "volume" in body else (section, name)
        vol = body["volume"] if "volume" in body else default
        if isinstance(vol, str) and vol not in volumes:
            known = ", ".join(volumes) or "none declared"
            implicit = "" if "volume" in body else " (the default)"
            problems.append(
                RefProblem(path=path, message=f"volume {vol!r}{implicit} is not declared in `volumes` ({known}){suggest(vol, list(volumes))}")
            )

    for name, body in datasets.items():
        if isinstance(body, dict):
            volume_ref("datasets", name, body, _default(Dataset, "volume"))
    for name, body in models.items():
        if isinstance(body, dict):
            volume_ref("models", name, body, _default(Model, "volume"))

    edges: dict[str, list[str]] = {}
    needs_sandbox: list[str] = []
    for name, body in stages.items():
        if not isinstance(body, dict):
            continue
        kind = body.get("kind")
        if kind in ("rl", "eval"):
            needs_sandbox.append(name)
        kinds: dict[str, type[BaseModel]] = {"rl": RLStage, "eval": EvalStage}
        stage_model = kinds.get(kind, SFTStage) if isinstance(kind, str) else SFTStage
        model = body.get("model")
        msg = _ref(model, ("model", "stage"), names, "model")
        if msg:
            problems.append(RefProblem(path=("stages", name, "model"), message=msg))
        elif isinstance(model, str) and model.startswith("stage."):
            upstream = model.partition(".")[2]
            edges.setdefault(name, []).append(upstream)
            up_body = stages.get(upstream)
            if isinstance(up_body, dict) and up_body.get("kind") == "eval":
                problems.append(RefProblem(
                    path=("stages", name, "model"),
                    message=f"{model} is an eval stage: it produces no model (name a model or a training stage)",
                ))
        if kind == "eval":
            problems += _eval_datasets(name, body, names, datasets)
        msg = _ref(body.get("train"), ("dataset",), names, "train")
        if msg:
            problems.append(RefProblem(path=("stages", name, "train"), message=msg))
        val = body.get("val")
        for i, item in enumerate(val if isinstance(val, list) else [val] if val is not None else []):
            msg = _ref(item, ("dataset",), names, "val")
            if msg:
                path: Path = ("stages", name, "val", i) if isinstance(val, list) else ("stages", name, "val")
                problems.append(RefProblem(path=path, message=msg))
        volume_ref("stages", name, body, _default(stage_model, "volume"))
        stage_secrets = body.get("secrets")
        if isinstance(stage_secrets, list):
            for i, key in enumerate(stage_secrets):
                if isinstance(key, str) and key not in secrets:
                    known = ", ".join(secrets) or "none declared"
                    problems.append(
                        RefProblem(
                            path=("stages", name, "secrets", i),
                            message=f"secret {key!r} is not declared in `secrets` ({known}){suggest(key, list(secrets))}",
                        )
                    )

    sandbox = data.get("sandbox")
    if isinstance(sandbox, dict):
        token = sandbox.get("token_secret")
        if isinstance(token, str) and token not in secrets:
            problems.append(
                RefProblem(path=("sandbox", "token_secret"), message=f"secret {token!r} is not declared in `secrets`")
            )
    if needs_sandbox and sandbox is None:
        first = needs_sandbox[0]
        what = "an RL" if stages[first].get("kind") == "rl" else "an eval"
        problems.append(
            RefProblem(
                path=("stages", first, "kind"),
                message=f"{what} stage calls the code sandbox: declare a top-level `sandbox:` (e.g. `sandbox: {{placement: sidecar}}`)",
            )
        )

    budget = data.get("budget")
    capped = budget.get("stages") if isinstance(budget, dict) else None
    if isinstance(capped, dict):
        for name in capped:
            if name not in stages:
                known = ", ".join(stages) or "none declared"
                problems.append(RefProblem(
                    path=("budget", "stages", name),
                    message=f"budget for unknown stage {name!r} (stages: {known}){suggest(str(name), list(stages))}",
                ))

    cycle = find_cycle(edges)
    if cycle:
        problems.append(
            RefProblem(
                path=("stages", cycle[0], "model"),
                message="dependency cycle: " + " → ".join(f"stage.{n}" for n in cycle),
            )
        )
    return problems


# Dataset formats whose prepared rows are RL rows (prompt + reward_model.ground_truth).
RL_FORMATS: frozenset[str] = frozenset({"dapo_math", "aime_2024", "aime_2025", "rl"})


def _eval_datasets(
    name: str, body: dict[str, Any], names: dict[str, list[str]], datasets: dict[str, Any]
) -> list[RefProblem]:
    """An eval stage's `datasets`: existing datasets whose rows carry a ground truth."""
    items = body.get("datasets")
    if not isinstance(items, list):
        return []  # the schema reports a missing or mistyped list
    out: list[RefProblem] = []
    for i, item in enumerate(items):
        msg = _ref(item, ("dataset",), names, "datasets")
        if msg:
            out.append(RefProblem(path=("stages", name, "datasets", i), message=msg))
            continue
        ds = datasets.get(str(item).partition(".")[2])
        fmt = ds.get("format") if isinstance(ds, dict) else None
        if isinstance(fmt, str) and fmt not in RL_FORMATS:
            out.append(RefProblem(
                path=("stages", name, "datasets", i),
                message=f"{item} has format {fmt!r}: evaluation needs problems with answers "
                f"(format {', '.join(sorted(RL_FORMATS))})",
            ))
    return out
