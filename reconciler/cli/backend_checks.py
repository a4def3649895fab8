"""What `retool validate` asks the spec's backend, offline: problems it would refuse
(`ChecksSpec.spec_problems`, e.g. Modal's GPU and timeout limits) and warnings
(`ChecksSpec.spec_warnings`, e.g. pip entries that compile from source). A backend without
`ChecksSpec` has neither; one that cannot be loaded adds a warning, never a failure.

Problems come back as `file:line:col field: message`, located at the field they name.
"""

from __future__ import annotations

from pydantic import BaseModel

from reconciler.backend import ChecksSpec
from reconciler.backends import get_runtime
from reconciler.errors import RetoolError
from reconciler.loader import LoadedSpec, default_state_dir
from reconciler.yamlpos import Pos, parse_yaml


class Findings(BaseModel):
    problems: list[str] = []
    warnings: list[str] = []


def backend_findings(loaded: LoadedSpec) -> Findings:
    try:
        runtime = get_runtime(loaded.spec, default_state_dir(loaded))
    except RetoolError as exc:
        return Findings(warnings=[f"the {loaded.spec.backend} backend's checks were skipped ({exc.summary})"])
    if not isinstance(runtime, ChecksSpec):
        return Findings()
    return Findings(
        problems=[located(loaded, p) for p in runtime.spec_problems(loaded.spec)],
        warnings=list(runtime.spec_warnings(loaded.spec)),
    )


def located(loaded: LoadedSpec, problem: str) -> str:
    """`stages.sft.resources: ...` -> `spec.yaml:63:5 stages.sft.resources: ...`."""
    field, sep, _ = problem.partition(": ")
    pos = locate(loaded, field) if sep else Pos(line=1, col=1)
    return f"{loaded.path}:{pos.line}:{pos.col} {problem}"


def locate(loaded: LoadedSpec, dotted: str) -> Pos:
    parsed = parse_yaml(loaded.text)
    parts: tuple[str | int, ...] = tuple(dotted.split("."))
    for n in range(len(parts), 0, -1):
        pos = parsed.keys.get(parts[:n]) or parsed.values.get(parts[:n])
        if pos is not None:
            return pos
    return parsed.root_pos
