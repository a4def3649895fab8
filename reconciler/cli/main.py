"""The `retool` command (typer + rich).

    retool validate SPEC                 schema, references and graph checks; touches nothing
    retool plan SPEC                     what apply would do, why, and what it costs
    retool apply SPEC|PLAN_FILE          do it (asks first unless --yes; a saved plan applies as is)
    retool status SPEC                   where every node stands
    retool render SPEC [stage.X]         the exact commands a stage runs (secrets by name only)
    retool report SPEC --out FILE        one HTML page: training curves, evaluations, pass@k
    retool doctor SPEC                   is the workspace ready for the first apply (token, secrets, image...)
    retool cancel SPEC stage.X           stop a running stage, keep its checkpoints
    retool schema                        the spec's JSON Schema (editor completion)
    retool state show|unlock             inspect state, clear a stale lock
    retool sandbox serve                 the SandboxFusion-compatible code sandbox

Every `RetoolError` prints as one red line plus its detail and hint, exit code 1; tracebacks
only with `--debug`. Nothing here imports torch, verl, ray or modal: backends do that lazily.
"""

from __future__ import annotations

import os

# Before pydantic builds its first validator: plugin discovery reads the entry points of
# every installed package, and retool uses no pydantic plugins. An explicit setting, even an
# empty one, wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import json
import shlex
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from reconciler.backend import poll_interval
from reconciler.backends import get_runtime, get_store
from reconciler.budget import parse_amount, require_approval
from reconciler.cli.state_commands import state_app
from reconciler.errors import RetoolError, TerminalError
from reconciler.graph import build_graph
from reconciler.loader import LoadedSpec, default_state_dir, load_spec, schema_text
from reconciler.plan import Plan
from reconciler.refresh import observe_and_plan, open_runtime, refresh_and_plan
from reconciler.state.base import LockInfo, StateStore
from reconciler.state.cache import read_state, remember
from reconciler.cli.plan_view import plan_markdown, render_plan




class _Flags:
    debug = False


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(error: RetoolError) -> None:
    console = err()
    console.print(Text(f"error: {error.summary}", style="bold red"))
    if error.detail:
        console.print(Text(error.detail))
    if error.hint:
        console.print(Text(f"hint: {error.hint}", style="yellow"))


class RetoolGroup(TyperGroup):
    """Turns errors into one clear message and an exit code (docs/architecture.md, "One error type, two kinds")."""

    def invoke(self, ctx: Any) -> Any:  # typer vendors click: its Context is not `click.Context`
        try:
            return super().invoke(ctx)
        except (
            typer.TyperException, typer.Exit, typer.Abort,  # typer >= 0.24 raises its own click's usage errors
        ):
            raise
        except RetoolError as error:
            if _Flags.debug:
                traceback.print_exc()
            print_error(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err().print(Text("interrupted", style="yellow"))
            raise typer.Exit(130) from None
        except Exception as error:  # a bug: say so briefly; the traceback is one flag away
            if _Flags.debug:
                traceback.print_exc()
            print_error(TerminalError(
                f"internal error: {type(error).__name__}: {error}", hint="run with --debug for the traceback"
            ))
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=RetoolGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Declarative, resumable ReTool training: plan, apply, status.",
)
sandbox_app = typer.Typer(no_args_is_help=True, help="The SandboxFusion-compatible code sandbox.")
app.add_typer(state_app, name="state")
app.add_typer(sandbox_app, name="sandbox")


@app.command("doctor")
def doctor_cmd(
    spec: Path = typer.Argument(..., help="The spec file (YAML).", dir_okay=False),
    skip_build: bool = typer.Option(False, "--skip-build", help="Do not build the image now (it can take minutes)."),
) -> None:
    """Check a workspace before the first apply: credentials, secrets, GPU types, image, volumes, state."""
    from reconciler.cli.doctor import run_doctor  # its tables and checks load only for this command

    run_doctor(spec, skip_build=skip_build)


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _Flags.debug = debug


# --------------------------------------------------------------------------- shared helpers

SpecArg = typer.Argument(..., help="The spec file (YAML).", exists=False, dir_okay=False)


def open_spec(path: Path) -> tuple[LoadedSpec, Path, StateStore]:
    loaded = load_spec(path)
    state_dir = default_state_dir(loaded)
    return loaded, state_dir, get_store(loaded.spec, state_dir)


def parse_addresses(values: list[str] | None) -> set[str] | None:
    items = {a.strip() for v in values or [] for a in v.split(",") if a.strip()}
    return items or None


class Format(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


# --------------------------------------------------------------------------- validate, schema


@app.command()
def validate(spec: Path = SpecArg) -> None:
    """Check a spec: schema, references, dependency graph, the backend's offline rules. Touches no state."""
    from reconciler.cli.backend_checks import backend_findings
    from reconciler.errors import SpecError

    loaded = load_spec(spec)
    graph = build_graph(loaded.spec)
    findings = backend_findings(loaded)
    for warning in findings.warnings:
        err().print(Text(f"warning: {warning}", style="yellow"))
    if findings.problems:
        raise SpecError(str(spec), findings.problems)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[node.kind] = kinds.get(node.kind, 0) + 1
    parts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items())
    out().print(Text(f"✓ {spec} is valid: {len(graph.nodes)} nodes ({parts})", style="green"))


@app.command()
def schema(output: Path | None = typer.Option(None, "--out", help="Write to FILE instead of stdout.")) -> None:
    """Print the spec's JSON Schema (point `# yaml-language-server: $schema=` at it)."""
    text = schema_text()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        err().print(f"wrote {output}")


# --------------------------------------------------------------------------- plan, apply


@app.command()
def plan(
    spec: Path = SpecArg,
    json_flag: bool = typer.Option(False, "--json", help="Machine-readable plan on stdout (same as --format json)."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, json or markdown."),
    output: Path | None = typer.Option(None, "--out", help="Save the plan; `retool apply FILE` applies exactly it."),
    detailed_exitcode: bool = typer.Option(
        False, "--detailed-exitcode",
        help="Exit 0 when there are no changes, 2 when there are, 3 when they exceed the spec's budget, 1 on error.",
    ),
    target: list[str] | None = typer.Option(None, "--target", help="Only this address and what it needs (repeatable)."),
    replace: list[str] | None = typer.Option(None, "--replace", help="Force a rerun of this address (repeatable)."),
    no_refresh: bool = typer.Option(False, "--no-refresh", help="Plan from recorded state without asking the backend."),
) -> None:
    """Show what `retool apply` would do, why, and what it would cost."""
    loaded, state_dir, store = open_spec(spec)
    runtime, notes = open_runtime(loaded, state_dir)
    state, state_notes = read_state(store, state_dir, assume_empty_if_unreachable=True)
    the_plan = refresh_and_plan(
        loaded, state, runtime, refresh=not no_refresh,
        targets=parse_addresses(target), replace=parse_addresses(replace), notes=[*state_notes, *notes],
    )
    if output is not None:
        from reconciler.apply.saved_plan import save_plan

        save_plan(the_plan, loaded, output)
    fmt = Format.json if json_flag else fmt
    if fmt is Format.json:
        typer.echo(the_plan.to_json(), nl=False)
    elif fmt is Format.markdown:
        typer.echo(plan_markdown(the_plan))
    else:
        render_plan(the_plan, out())
        if output is not None:
            out().print(Text(f"\nSaved the plan to {output}; apply exactly it with `retool apply {output}`."))
    if detailed_exitcode:
        raise typer.Exit(plan_exit_code(the_plan))


# `retool plan --detailed-exitcode` (1 is any error).
EXIT_NO_CHANGES, EXIT_CHANGES, EXIT_OVER_BUDGET = 0, 2, 3


def plan_exit_code(the_plan: Plan) -> int:
    if the_plan.over_budget:
        return EXIT_OVER_BUDGET
    return EXIT_CHANGES if the_plan.has_changes else EXIT_NO_CHANGES


@app.command("apply")
def apply_cmd(
    source: Path = typer.Argument(..., metavar="SPEC_OR_PLAN", help="A spec, or a plan saved with `retool plan --out`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    target: list[str] | None = typer.Option(None, "--target", help="Only this address and what it needs (repeatable)."),
    replace: list[str] | None = typer.Option(None, "--replace", help="Force a rerun of this address (repeatable)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Launch stages and return; `retool status` follows them."),
    prune: bool = typer.Option(False, "--prune", help="Delete the data of volumes removed from the spec."),
    allow_data_loss: bool = typer.Option(False, "--allow-data-loss", help="With --prune: protected volumes too."),
    approve_cost: str | None = typer.Option(
        None, "--approve-cost", metavar="AMOUNT",
        help="Apply a plan that exceeds the spec's budget: name its cost exactly as the plan shows it (e.g. 1234.56).",
    ),
) -> None:
    """Make reality match the spec, recording state after every step."""
    # Imported here: `plan`, `status` and `validate` never need the engine or its progress view.
    from reconciler.apply import engine
    from reconciler.apply.saved_plan import read_saved_plan, saved_plan_data
    from reconciler.cli.apply_view import ApplyView, render_apply_result
    from reconciler.state.lease import holding

    approved = parse_amount(approve_cost) if approve_cost is not None else None
    data = saved_plan_data(source)
    if data is not None and (target or replace):
        raise TerminalError(
            "--target and --replace cannot change a saved plan",
            hint="make a new plan with them: `retool plan SPEC --target ADDR --out FILE`",
        )
    saved = read_saved_plan(source, data) if data is not None else None
    loaded = saved[1] if saved is not None else load_spec(source)
    state_dir = default_state_dir(loaded)
    store = get_store(loaded.spec, state_dir)
    runtime = get_runtime(loaded.spec, state_dir)
    # The lock comes first: a refused apply prints no plan, and nothing changes between the
    # plan shown and the apply of it.
    with holding(store, LockInfo(command=f"retool apply {source}")) as lock_id:
        if store.taken_over is not None:
            err().print(Text(store.taken_over.note, style="yellow"))
        if saved is not None:
            the_plan = saved[0]
            # Refuse a stale plan before showing it as if it would apply (apply re-checks under the lock).
            engine.check_plan_fresh(the_plan, store.read(), saved=True)
        else:
            the_plan = refresh_and_plan(
                loaded, store.read(), runtime, targets=parse_addresses(target), replace=parse_addresses(replace)
            )
        console = out()
        render_plan(the_plan, console, show_unchanged=False)
        state = store.read()
        running = state is not None and any(r.status == "running" for r in state.nodes.values())
        if not the_plan.has_changes and not running:
            console.print(Text("No changes. Nothing to apply.", style="green"))
            return
        require_approval(the_plan.budget, approved)  # before asking: an over-budget plan is refused outright
        if saved is None and not yes and not typer.confirm("Apply this plan?", default=False):
            console.print(Text("Apply cancelled.", style="yellow"))
            raise typer.Exit(1)
        with ApplyView(err()) as view:
            result = engine.apply(
                the_plan, loaded, store, runtime, wait=not no_wait, prune=prune, allow_data_loss=allow_data_loss,
                saved=saved is not None, on_event=view, state_dir=str(state_dir),
                lock_id=lock_id, approved_usd=approved,
                poll_interval=poll_interval(runtime),
            )
        remember(state_dir, store, result.state)
        render_apply_result(result, console)
        raise typer.Exit(result.exit_code)


@app.command()
def cancel(
    spec: Path = SpecArg,
    address: str = typer.Argument(..., help="The stage to stop, e.g. stage.sft."),
) -> None:
    """Stop a running stage; its checkpoints are kept (apply resumes from them)."""
    from reconciler.apply import engine

    loaded, state_dir, store = open_spec(spec)
    runtime = get_runtime(loaded.spec, state_dir)
    outcome = engine.cancel(address, loaded, store, runtime, lock_info=LockInfo(command=f"retool cancel {spec} {address}"))
    out().print(Text(outcome.message, style="yellow"))


# --------------------------------------------------------------------------- status, render


@app.command()
def status(
    spec: Path = SpecArg,
    json_flag: bool = typer.Option(False, "--json", help="Machine-readable status on stdout."),
    watch: float | None = typer.Option(None, "--watch", help="Refresh every N seconds until Ctrl-C.", min=0.5),
) -> None:
    """Where every node stands: sync, health, fingerprint, steps, checkpoint, elapsed, cost."""
    from reconciler.status import compute_status, render_status

    loaded, state_dir, store = open_spec(spec)
    runtime, notes = open_runtime(loaded, state_dir)
    console = out()
    while True:
        state, state_notes = read_state(store, state_dir)
        observed, the_plan = observe_and_plan(loaded, state, runtime, notes=[*state_notes, *notes])
        report = compute_status(the_plan, loaded.spec, state, observed, lock=_lock_info(store))
        if json_flag:
            typer.echo(report.model_dump_json(indent=2))
        else:
            if watch is not None:
                console.clear()
            render_status(report, console)
        if watch is None:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


def _lock_info(store: StateStore) -> LockInfo | None:
    try:
        return store.lock_info()
    except RetoolError:
        return None  # an unreachable shared store: status says so through its notes


@app.command()
def report(
    spec: Path = SpecArg,
    output: Path = typer.Option(Path("report.html"), "--out", help="Where to write the HTML page."),
) -> None:
    """One self-contained HTML page: training curves, the evaluation table, pass@k curves."""
    from reconciler.cli.report import gather_report, render_report

    loaded, state_dir, store = open_spec(spec)
    runtime, _ = open_runtime(loaded, state_dir)
    state, notes = read_state(store, state_dir, assume_empty_if_unreachable=True)
    for note in notes:
        err().print(Text(f"warning: {note}", style="yellow"))
    output.write_text(render_report(gather_report(loaded.spec, state, runtime)), encoding="utf-8")
    out().print(Text(f"wrote {output}", style="green"))


@app.command()
def render(
    spec: Path = SpecArg,
    address: str | None = typer.Argument(None, help="One stage (stage.X); default every stage."),
    json_flag: bool = typer.Option(False, "--json", help="The commands as JSON."),
) -> None:
    """Print the exact commands a stage runs: argv and environment (secrets by name only)."""
    from reconciler.apply import engine

    loaded, state_dir, store = open_spec(spec)
    runtime = get_runtime(loaded.spec, state_dir)
    # Rendering needs no backend access: recorded state (or its local copy) is enough.
    state, notes = read_state(store, state_dir, assume_empty_if_unreachable=True)
    for note in notes:
        err().print(Text(f"warning: {note}", style="yellow"))
    graph = build_graph(loaded.spec)
    stages = [a for a in graph.order() if graph.nodes[a].kind == "stage"]
    if address is not None and address not in stages:
        raise TerminalError(f"{address} is not a stage of this spec", hint="stages: " + ", ".join(stages))
    the_plan = refresh_and_plan(loaded, state, runtime, refresh=False)
    rendered: list[dict[str, Any]] = []
    for addr in [address] if address else stages:
        change = the_plan.change(addr)
        restart_id = change.fingerprints.restart_id if change and change.fingerprints else ""
        total = engine.planned_total_steps(loaded, state, graph.nodes[addr].name)
        ctx = engine.stage_context(
            loaded, state, graph.nodes[addr], restart_id=restart_id,
            total=total if total is not None else (change.total_steps if change else None),
            resume_from=change.resume_from if change else None, state_dir=str(state_dir),
        )
        commands = runtime.render_stage(ctx)
        rendered.append({"address": addr, "restart_id": restart_id, "total_steps": ctx.total_steps,
                         "resume_from": ctx.resume_from, "commands": [c.model_dump() for c in commands]})
    if json_flag:
        typer.echo(json.dumps(rendered, indent=2))
        return
    for item in rendered:
        _print_rendered(item)


def _print_rendered(item: dict[str, Any]) -> None:
    start = "from scratch" if item["resume_from"] is None else f"resuming from step {item['resume_from']}"
    lines = [f"# {item['address']}: restart id {item['restart_id'][:12]}, {item['total_steps']} steps, {start}"]
    for cmd in item["commands"]:
        if cmd["description"]:
            lines.append(f"# {cmd['description']}")
        if cmd["secret_env"]:
            lines.append("# secrets (values never shown): " + ", ".join(cmd["secret_env"]))
        if cmd["cwd"]:
            lines.append(f"cd {shlex.quote(cmd['cwd'])}")
        parts = [f"{k}={shlex.quote(v)}" for k, v in sorted(cmd["env"].items())]
        parts += [shlex.quote(a) for a in cmd["argv"]]
        lines.append(" \\\n    ".join(parts))
        lines.append("")
    typer.echo("\n".join(lines))


# --------------------------------------------------------------------------- sandbox


@sandbox_app.command("serve")
def sandbox_serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    workers: int | None = typer.Option(None, "--workers", help="Executions at once; default the CPU count."),
    max_queue: int | None = typer.Option(None, "--max-queue", help="Requests allowed to wait before HTTP 503."),
    memory_limit_mb: int | None = typer.Option(None, "--memory-limit-mb", help="Default per-execution memory limit."),
    max_output_bytes: int | None = typer.Option(None, "--max-output-bytes", help="Per-stream output cap."),
    preload: str | None = typer.Option(None, "--preload", help="Comma-separated modules to pre-import."),
    token_env: str | None = typer.Option(
        None, "--token-env", help="Name of the environment variable holding the bearer token (never the token)."
    ),
) -> None:
    """Serve the SandboxFusion contract (POST /run_code, GET /v1/ping)."""
    import os

    from sandbox.server import serve  # lazy: the sandbox stack is not on plan's path

    options: dict[str, Any] = {
        "workers": workers, "max_queue": max_queue, "memory_limit_mb": memory_limit_mb,
        "max_output_bytes": max_output_bytes,
        "preload": [m.strip() for m in preload.split(",") if m.strip()] if preload is not None else None,
    }
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise TerminalError(f"--token-env {token_env}: that environment variable is not set")
        options["token"] = token
    from runtime.sandbox_process import retool_errors

    with retool_errors():  # e.g. invalid RETOOL_SANDBOX_* settings: one clear line
        serve(host, port, **{k: v for k, v in options.items() if v is not None})


def main() -> None:
    """Console-script entry point (`retool`)."""
    app(prog_name="retool")


if __name__ == "__main__":
    main()
