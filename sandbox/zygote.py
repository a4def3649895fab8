"""The pre-warmed interpreter: `python -m sandbox.zygote '<ZygoteConfig JSON>'`.

Started by the server with a clean environment (so no secret is ever in its memory or its
/proc/<pid>/environ) and thread counts pinned to 1 before numpy loads, so it stays
single-threaded and `fork` is safe. It isolates the network, probes the private filesystem
view (or builds the per-slot mount namespaces where overlays are refused), imports the preload list, freezes the GC (forks then leave those pages shared)
and loops: each control message carries one socket -> fork that slot's forker on it.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import traceback

from sandbox import linux
from sandbox.forker import serve_slot
from sandbox.isolation import (
    build_slot_namespaces,
    build_views,
    can_switch_uid,
    isolate_network,
    unreachable_interpreter_paths,
)
from sandbox.protocol import Isolation, SlotSpec, SpawnForker, ZygoteConfig, ZygoteReady
from sandbox.view import ViewPlan
from sandbox.warmup import preload


def main(argv: list[str]) -> None:
    config = ZygoteConfig.model_validate_json(argv[1])
    control = socket.socket(fileno=config.control_fd)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the server
    isolation = Isolation()
    isolate_network(isolation)
    uids = [slot.uid for slot in config.slots if slot.uid is not None]
    use_uids = bool(uids) and len(uids) == len(config.slots) and can_switch_uid(uids[0])
    if uids and not use_uids:
        isolation.notes.append("cannot switch to the slot uids: executions run as the server's user")
    slots = {s.index: s if use_uids else s.model_copy(update={"uid": None}) for s in config.slots}
    views = build_views(list(slots.values()), config.work_root, isolation) if config.filesystem_view else {}
    if not config.filesystem_view:
        isolation.notes.append("private filesystem view turned off (filesystem_view=false): absolute paths are refused")
    namespaces = {} if views else build_slot_namespaces(config.slots, isolation)
    if use_uids and not namespaces and not views and unreachable_interpreter_paths():
        use_uids = False  # other uids could not even import the standard library
        isolation.notes.append("the interpreter is not readable by other users: executions run as the server's user")
    isolation.separate_uid = use_uids
    if not use_uids:
        slots = {index: s.model_copy(update={"uid": None}) for index, s in slots.items()}
    loaded, failures = preload(config.preload, config.warmup)
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forkers are reaped by the kernel
    ready = ZygoteReady(pid=os.getpid(), isolation=isolation, preloaded=loaded, preload_failures=failures)
    control.send(ready.encode())
    serve(control, slots, namespaces, views)


def serve(
    control: socket.socket, slots: dict[int, SlotSpec], namespaces: dict[int, int], views: dict[int, ViewPlan]
) -> None:
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 4096, 1)
        except InterruptedError:
            continue
        if not msg:
            return  # the server closed its end
        spawn = SpawnForker.model_validate_json(msg)
        for fd in fds:
            if os.fork() == 0:
                _run_forker(control, fd, slots[spawn.slot], namespaces, views.get(spawn.slot))
            os.close(fd)


def _run_forker(
    control: socket.socket, fd: int, slot: SlotSpec, namespaces: dict[int, int], view: ViewPlan | None
) -> None:
    code = 0
    try:
        control.close()
        for index, ns_fd in namespaces.items():  # keep only this slot's namespace
            if index != slot.index:
                os.close(ns_fd)
        serve_slot(socket.socket(fileno=fd), slot, namespaces.get(slot.index), view)
    except (BrokenPipeError, ConnectionResetError):
        code = 1  # the server went away
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
