"""The sandbox job's entrypoint on the Ray cluster:
`python -m runtime.ray.sandbox_job RECORD.json SUBMISSION_ID SANDBOX_JSON`.

It serves `python -m sandbox.server` on its node's cluster address (the port the spec
names, or a free one), waits until it answers, then writes the RaySandbox record (its URL)
into the shared storage, where the backend reads it. The server runs in this entrypoint's
process group, so `ray job stop` stops both; SIGTERM is passed on, and the server dies
with this process when it is killed (a node or head going away).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from reconciler.spec import Sandbox
from runtime import records
from runtime.ray.guard import signal_on_parent_death
from runtime.records import RaySandbox
from runtime.sandbox_process import SandboxProcess, free_port, server_argv, wait_until_serving


def die_with_parent() -> None:
    """The server is killed when this entrypoint dies, however it dies: a sandbox never
    outlives its job, e.g. across a head restart."""
    try:
        signal_on_parent_death(signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def node_ip() -> str:
    import ray.util

    return str(ray.util.get_node_ip_address())


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m runtime.ray.sandbox_job RECORD.json SUBMISSION_ID SANDBOX_JSON", file=sys.stderr)
        return 2
    record_path, submission_id = Path(argv[0]), argv[1]
    sandbox = Sandbox.model_validate_json(argv[2])
    ip = node_ip()
    port = sandbox.port or free_port(ip)
    argv_server = server_argv(
        ip, port, workers=sandbox.workers, memory_limit_mb=sandbox.memory_limit_mb,
        max_output_bytes=sandbox.max_output_bytes, max_queue=sandbox.max_queue, preload=list(sandbox.preload),
    )
    print(f"[retool] sandbox: {' '.join(argv_server)}", flush=True)
    server = subprocess.Popen(argv_server, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda signum, _frame: server.send_signal(signum))
    started = SandboxProcess(pid=server.pid, url=f"http://{ip}:{port}", port=port, log_path="")
    try:
        wait_until_serving(started)
    except BaseException:
        server.kill()
        raise
    records.save(record_path, RaySandbox(submission_id=submission_id, url=started.url, node_ip=ip, pid=server.pid))
    print(f"[retool] sandbox serving at {started.url}", flush=True)
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
