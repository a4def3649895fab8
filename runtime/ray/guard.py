"""Children that die with their parent: `python -m runtime.ray.guard PARENT_PID ARGV...`.

A Ray job's entrypoint (or a node rank's actor) starts its trainer through this guard, which
asks the kernel for SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`, kept across exec)
and then becomes the trainer. An entrypoint killed with SIGKILL (the OOM killer, a node agent)
then takes its trainer with it, instead of leaving it to write checkpoints for a run that
retool already reports failed.
"""

from __future__ import annotations

import os
import signal
import sys


def guarded(argv: list[str]) -> list[str]:
    """`argv` started so that it gets SIGTERM when this process dies."""
    return [sys.executable, "-m", "runtime.ray.guard", str(os.getpid()), *argv]


def signal_on_parent_death(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux
    `PR_SET_PDEATHSIG`; kept across exec). Elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1 = PR_SET_PDEATHSIG


def exec_guarded(argv: list[str]) -> int:
    """Ask for SIGTERM when the parent dies, then become ARGV (argv[0] is the parent's pid)."""
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m runtime.ray.guard PARENT_PID ARGV...", file=sys.stderr)
        return 2
    signal_on_parent_death(signal.SIGTERM)
    if os.getppid() != int(argv[0]):  # the parent died before the request took effect
        return 143
    os.execvp(argv[1], argv[1:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(exec_guarded(sys.argv[1:]))
