"""The pre-warmed interpreter: `python -m sandbox.zygote '<ZygoteConfig JSON>'`.

Started by the server with a clean environment (so no secret is ever in its memory or its
/proc/<pid>/environ) and thread counts pinned to 1 before numpy loads, so it stays
single-threaded and `fork` is safe. It isolates the network, builds the per-slot mount
namespaces, imports the preload list, freezes the GC (children then leave those pages
shared) and loops: one control message carrying one socket fd -> fork a supervisor.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import traceback

from sandbox import linux
from sandbox.isolation import build_slot_namespaces, can_switch_uid, isolate_network, unreachable_interpreter_paths
from sandbox.protocol import Isolation, ZygoteConfig, ZygoteReady, encode_frame
from sandbox.supervisor import supervise
from sandbox.warmup import preload


def main(argv: list[str]) -> None:
    config = ZygoteConfig.model_validate_json(argv[1])
    control = socket.socket(fileno=config.control_fd)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the server
    isolation = Isolation()
    isolate_network(isolation)
    uids = [slot.uid for slot in config.slots if slot.uid is not None]
    use_uids = bool(uids) and len(uids) == len(config.slots) and can_switch_uid(uids[0])
    isolation.separate_uid = use_uids
    if uids and not use_uids:
        isolation.notes.append("cannot switch to the slot uids: executions run as the server's user")
    namespaces = build_slot_namespaces(config.slots, isolation)
    if use_uids and not namespaces and unreachable_interpreter_paths():
        use_uids = isolation.separate_uid = False  # other uids could not even import the stdlib
        isolation.notes.append("the interpreter is not readable by other users: executions run as the server's user")
    loaded, failures = preload(config.preload, config.warmup)
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    ready = ZygoteReady(pid=os.getpid(), isolation=isolation, preloaded=loaded, preload_failures=failures)
    control.send(encode_frame(ready))
    serve(control, namespaces, use_uids)


def serve(control: socket.socket, namespaces: dict[int, int], use_uids: bool) -> None:
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 16, 4)
        except InterruptedError:
            continue
        if not msg:
            return  # the server closed its end
        for fd in fds:
            if os.fork() == 0:
                _run_supervisor(control, fd, namespaces, use_uids)
            os.close(fd)


def _run_supervisor(control: socket.socket, fd: int, namespaces: dict[int, int], use_uids: bool) -> None:
    code = 0
    try:
        control.close()
        supervise(socket.socket(fileno=fd), namespaces, use_uids)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        code = 1  # the server went away mid-request: nothing to report to
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
