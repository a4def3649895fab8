"""What `retool apply` shows while it runs: one line per transition, a progress bar per
stage being waited on. It only consumes `ApplyEvent`s (reconciler/apply/engine.py)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from reconciler.apply.engine import ApplyEvent, ApplyResult


class ApplyView:
    """Context manager: `with ApplyView(console) as view: apply(..., on_event=view)`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[message]}", style="dim"),
            console=console, transient=True,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ApplyView:
        self.progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def _line(self, symbol: str, style: str, address: str, message: str) -> None:
        text = Text(f"{symbol} ", style=style)
        text.append(address, style="bold")
        if message:
            text.append(f"  {message}")
        self.progress.console.print(text)

    def __call__(self, event: ApplyEvent) -> None:
        kind, addr = event.kind, event.address
        if kind == "start":
            self._line("→", "cyan", addr, event.action)
        elif kind == "progress":
            self._progress(event)
        elif kind == "done":
            self._close(addr)
            self._line("✓", "green", addr, event.message)
        elif kind == "failed":
            self._close(addr)
            self._line("✗", "red", addr, event.message)
        elif kind == "skipped":
            self._line("-", "yellow", addr, f"skipped {event.message}")
        elif kind == "blocked":
            self._line("!", "bold red", addr, f"blocked: {event.message}")
        elif kind == "detached":
            self._close(addr)
            self.progress.console.print(Text(f"{addr}: {event.message}", style="yellow"))
        elif kind == "note":
            self.progress.console.print(Text(f"  {addr + ': ' if addr else ''}{event.message}", style="dim"))

    def _progress(self, event: ApplyEvent) -> None:
        task = self.tasks.get(event.address)
        if task is None:
            task = self.progress.add_task(event.address, total=event.total, message="")
            self.tasks[event.address] = task
        self.progress.update(task, total=event.total, completed=event.step or 0, message=event.message)

    def _close(self, address: str) -> None:
        task = self.tasks.pop(address, None)
        if task is not None:
            self.progress.remove_task(task)


def render_apply_result(result: ApplyResult, console: Console) -> None:
    """The closing summary: counts per outcome, then why it stopped, if it did."""
    counts: dict[str, int] = {}
    for r in result.results:
        if r.result != "unchanged":
            counts[r.result] = counts.get(r.result, 0) + 1
    summary = ", ".join(f"{n} {what}" for what, n in counts.items()) or "nothing changed"
    if result.detached:
        console.print(Text(f"Detached ({summary}); `retool status` or `retool apply` re-attaches.", style="yellow"))
    elif result.ok:
        console.print(Text(f"Apply complete: {summary}.", style="bold green"))
    else:
        console.print(Text(f"Apply finished with errors: {summary}.", style="bold red"))
        for r in result.results:
            if r.result in ("failed", "blocked"):
                console.print(Text(f"  {r.address}: {r.message}", style="red"))
    if result.stopped:
        console.print(Text(f"Stopped before {result.stopped}", style="red"))
