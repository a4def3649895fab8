"""Detached process groups that outlive `retool apply`, and how to find them again.

`start_detached` starts `python -m runtime.processes <plan.json>` as the leader of a new
session (own process group, stdin from /dev/null, stdout+stderr to the run's log). That
small wrapper runs the plan's commands in order and, when they end, writes an exit file
beside the log — so a later `poll` can tell a run that finished (exit file, with its code)
from one that was lost (no process, no exit file: killed with SIGKILL, machine rebooted).

Liveness checks the pid *and* its kernel start time, so a recycled pid is not mistaken
for our run. torchrun starts its workers in sessions of their own, so signalling the
process group does not reach them; every process of a run therefore carries a run tag in
its environment (`RETOOL_RUN_TAG`, inherited by all descendants), and `terminate_run`
signals the group and every tagged process — also orphans whose leader was SIGKILLed. Secrets never pass through here as values: commands carry non-secret env;
secrets reach the children by inheritance from the launching environment.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from runtime import records
from runtime.records import ExitRecord, PlannedCommand, RunPlan


class ProcessInfo(BaseModel):
    pid: int
    pgid: int
    start_ticks: int | None = None
    tag: str = ""


RUN_TAG_ENV = "RETOOL_RUN_TAG"


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks since boot (None off Linux or if gone)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def is_alive(pid: int, ticks: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, given `ticks`, is the process started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _state(pid) in ("Z", "X"):
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        return False
    if ticks is not None:
        now = start_ticks(pid)
        if now is not None and now != ticks:
            return False  # pid recycled
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel about the group as a whole
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `RETOOL_RUN_TAG=<tag>` (Linux /proc)."""
    if not tag:
        return []
    needle = f"{RUN_TAG_ENV}={tag}".encode() + b"\0"
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ or environ.endswith(needle[:-1]):
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------- launcher side


def start_detached(
    commands: list[PlannedCommand], *, log_path: Path, exit_path: Path, env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ProcessInfo:
    """Start the wrapper for `commands` in a new session; return at once."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path = exit_path.with_name(exit_path.name.replace(".exit.json", "") + ".plan.json")
    records.save(plan_path, RunPlan(commands=commands, exit_path=str(exit_path)))
    exit_path.unlink(missing_ok=True)
    tag = uuid.uuid4().hex
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.processes", str(plan_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env={**(env if env is not None else os.environ), RUN_TAG_ENV: tag},
            cwd=cwd,
        )
    return ProcessInfo(pid=proc.pid, pgid=proc.pid, start_ticks=start_ticks(proc.pid), tag=tag)


def read_exit(exit_path: Path) -> ExitRecord | None:
    return records.load(ExitRecord, exit_path)


def write_exit(exit_path: Path, record: ExitRecord) -> None:
    records.save(exit_path, record)


def run_members(pgid: int | None, tag: str = "") -> list[int]:
    """Live processes of a run: its process group plus every process carrying its tag."""
    members = set(group_members(pgid) if pgid else []) | set(tagged_processes(tag))
    return sorted(members)


def _signal_all(pgid: int | None, pids: list[int], sig: signal.Signals) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate_run(pgid: int | None, tag: str = "", *, grace_s: float = 20.0, poll_s: float = 0.2) -> bool:
    """SIGTERM the run (group and tagged processes), wait up to `grace_s`, then SIGKILL
    what is left. Returns True when SIGKILL was needed."""
    members = run_members(pgid, tag)
    if not members:
        return False
    _signal_all(pgid, members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not run_members(pgid, tag):
            if pgid:
                _reap(pgid)
            return False
        time.sleep(poll_s)
    _signal_all(pgid, run_members(pgid, tag), signal.SIGKILL)
    for _ in range(50):
        if not run_members(pgid, tag):
            break
        time.sleep(0.1)
    if pgid:
        _reap(pgid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tail(path: Path, lines: int = 40, max_bytes: int = 65536) -> list[str]:
    """The last `lines` lines of a log (tqdm's carriage returns count as line ends)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    parts = [p.rstrip() for p in data.replace("\r", "\n").split("\n")]
    return [p for p in parts if p.strip()][-lines:]


_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception))):(.*)$")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")


def error_line(lines: list[str]) -> str:
    """The most telling line of a failed run's log: the last exception raised by the trainer
    (torchrun's own ChildFailedError summary says nothing), with its continuation line when
    the message spills over. '' when there is none."""
    found = ""
    for i, line in enumerate(lines):
        m = _EXCEPTION.match(line.strip())
        if not m or m.group(2) == "ChildFailedError":
            continue
        text = f"{m.group(2)}:{m.group(3)}".rstrip()
        if text.endswith(":") and i + 1 < len(lines):
            text += " " + _RANK_PREFIX.sub("", lines[i + 1].strip())
        found = text
    return found[:300]


def this_interpreter(argv: list[str]) -> list[str]:
    """`torchrun` / `python` of this environment (the venv may not be on PATH)."""
    bindir = Path(sys.executable).parent
    if argv and argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv and argv[0] == "torchrun":
        exe = bindir / "torchrun"
        return [str(exe), *argv[1:]] if exe.exists() else [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return argv


# --------------------------------------------------------------------------- wrapper side


def run_plan(plan: RunPlan) -> int:
    """Run the commands in order; write the exit file; return the exit code."""
    started = time.time()
    exit_path = Path(plan.exit_path)
    stop: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)
        for c in child:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code, failed = 0, None
    for index, cmd in enumerate(plan.commands):
        if stop:
            break
        print(f"[retool] command {index + 1}/{len(plan.commands)}: {' '.join(cmd.argv)}", flush=True)
        env = {**os.environ, **cmd.env}
        try:
            child[:] = [subprocess.Popen(cmd.argv, env=env, cwd=cmd.cwd, stdin=subprocess.DEVNULL)]
        except OSError as e:
            print(f"[retool] cannot start {cmd.argv[0]}: {e}", flush=True)
            code, failed = 127, index
            break
        code = child[0].wait()
        if code != 0:
            failed = index
            break
    sig = signal.Signals(stop[0]).name if stop else None
    if stop and code == 0:
        code = 128 + stop[0]
    print(f"[retool] exit {code}" + (f" ({sig})" if sig else ""), flush=True)
    write_exit(exit_path, ExitRecord(
        returncode=code, signal=sig, failed_command=failed, started_at=started, cancelled=bool(stop),
    ))
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runtime.processes PLAN.json", file=sys.stderr)
        return 2
    plan = records.parse(RunPlan, Path(argv[0]).read_text(), source=argv[0])
    return run_plan(plan)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
