"""`retool state show` and `retool state unlock ID`: look at recorded state, clear a lock
whose holder is gone. Without a spec they use `.retool/` of the current repository."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from reconciler.backends import get_store
from reconciler.loader import default_state_dir, find_repo_root, load_spec
from reconciler.state.base import StateStore, format_age
from reconciler.state.local import LocalStore

state_app = typer.Typer(no_args_is_help=True, help="Inspect recorded state, clear a stale lock.")


def _state_store(spec: Path | None, state_dir: Path | None) -> StateStore:
    if state_dir is not None:
        return LocalStore(state_dir)
    if spec is not None:
        loaded = load_spec(spec)
        return get_store(loaded.spec, default_state_dir(loaded))
    return LocalStore(find_repo_root(Path.cwd() / "retool.yaml") / ".retool")


StateSpecArg = typer.Argument(None, help="The spec whose state to use; default `.retool/` of this repository.")
StateDirOpt = typer.Option(None, "--state-dir", help="A local state directory (overrides the spec's).")


@state_app.command("show")
def state_show(
    spec: Path | None = StateSpecArg,
    state_dir: Path | None = StateDirOpt,
    json_flag: bool = typer.Option(False, "--json", help="The raw state JSON."),
) -> None:
    """Print the recorded state: serial, lineage, lock, one row per node."""
    from rich.table import Table  # the table view and status's formatting load only for this command

    from reconciler.status import format_duration

    store = _state_store(spec, state_dir)
    state = store.read()
    if json_flag:
        typer.echo(state.model_dump_json(indent=2) if state else "null")
        return
    console = Console(highlight=False, soft_wrap=True)
    if state is None:
        console.print(f"no state in {store.describe()}")
        return
    console.print(Text(f"{store.describe()} · serial {state.serial} · lineage {state.lineage}", style="bold"))
    lock = store.lock_info()
    if lock is not None:
        console.print(Text(
            f"locked {lock.id} by {lock.who} (pid {lock.pid}) running `{lock.command}` for "
            f"{format_age(time.time() - lock.created_at)}", style="yellow",
        ))
    table = Table(box=None, header_style="bold")
    for col in ("address", "status", "restart id", "steps", "elapsed", "updated", "message"):
        table.add_column(col)
    for addr, rec in state.nodes.items():
        steps = f"{rec.steps_done}/{rec.total_steps}" if rec.kind == "stage" else ""
        elapsed = (rec.finished_at or time.time()) - rec.started_at if rec.started_at else None
        table.add_row(
            addr, rec.status, rec.restart_id[:12], steps, format_duration(elapsed),
            format_age(time.time() - rec.updated_at) + " ago", Text(rec.message),
        )
    console.print(table)


@state_app.command("unlock")
def state_unlock(
    lock_id: str = typer.Argument(..., metavar="ID", help="The lock ID printed by the refused command."),
    spec: Path | None = StateSpecArg,
    state_dir: Path | None = StateDirOpt,
) -> None:
    """Clear a lock whose holder is gone. Refuses an ID that is not the held lock's."""
    store = _state_store(spec, state_dir)
    holder = store.lock_info()
    store.unlock(lock_id)
    who = f" held by {holder.who} (pid {holder.pid}) running `{holder.command}`" if holder else ""
    Console(highlight=False, soft_wrap=True).print(Text(f"unlocked {lock_id}{who}", style="green"))
