"""`retool doctor SPEC`: is this workspace ready for the spec's first apply?

It asks the spec's backend for its readiness rows (the Modal backend: token, connection,
each referenced secret with its keys, GPU types, the image built eagerly, volumes, the state
store and its lock; runtime/modal/doctor.py); a backend without that capability gets its
`preflight` and the state store's rows (reconciler/readiness.py) and prints a table of what is ready and what
to fix. Exit 0 when nothing needs fixing, 1 otherwise. Without a Modal token it answers at
once: the token is looked for locally before anything touches the network.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from reconciler.backend import ChecksReadiness, OpensSharedState
from reconciler.backends import get_runtime, get_store
from reconciler.errors import RetoolError
from reconciler.loader import LoadedSpec, default_state_dir, load_spec
from reconciler.readiness import DoctorCheck, store_checks
from reconciler.state.base import StateStore

STYLES = {"ready": "green", "to fix": "bold red", "skipped": "dim", "note": "yellow"}
MARKS = {"ready": "✓", "to fix": "✗", "skipped": "-", "note": "!"}


def doctor_rows(loaded: LoadedSpec, state_dir: Path, *, build_image: bool = True) -> list[DoctorCheck]:
    """Every readiness row for the spec: the backend's own (`ChecksReadiness`), or its
    preflight and the state store's rows."""
    spec = loaded.spec
    try:
        runtime = get_runtime(spec, state_dir)
    except RetoolError as exc:
        return [DoctorCheck(check=f"{spec.backend} backend", status="to fix", detail=exc.summary, fix=exc.hint)]

    def open_store() -> StateStore:
        shared = runtime.shared_store(spec) if isinstance(runtime, OpensSharedState) else None
        return shared if shared is not None else get_store(spec, state_dir)  # the backend's client first

    if isinstance(runtime, ChecksReadiness):
        return list(runtime.doctor_checks(spec, open_store, build_image=build_image))
    problems = runtime.preflight(spec)
    rows = [DoctorCheck(check=f"{spec.backend} backend", status="to fix", detail=p) for p in problems] or [
        DoctorCheck(check=f"{spec.backend} backend", status="ready", detail="preflight passed")
    ]
    return [*rows, *store_checks(open_store)]


def render_rows(rows: list[DoctorCheck], console: Console) -> None:
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail / fix")
    for row in rows:
        style = STYLES[row.status]
        text = Text(row.detail)
        if row.fix:
            text.append(f"\n→ {row.fix}", style="yellow")
        table.add_row(Text(MARKS[row.status], style=style), row.check, Text(row.status, style=style), text)
    console.print(table)
    counts = {s: sum(1 for r in rows if r.status == s) for s in STYLES}
    summary = f"{counts['ready']} ready, {counts['to fix']} to fix"
    if counts["skipped"]:
        summary += f", {counts['skipped']} skipped"
    console.print(Text(summary, style="bold red" if counts["to fix"] else "bold green"))


def run_doctor(spec: Path, *, skip_build: bool) -> None:
    """`retool doctor`: the rows as a table; exit 1 when anything is to fix."""
    loaded = load_spec(spec)
    rows = doctor_rows(loaded, default_state_dir(loaded), build_image=not skip_build)
    render_rows(rows, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(1 if any(r.status == "to fix" for r in rows) else 0)
