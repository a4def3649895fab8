"""One Ray node per container: the head on rank 0, `ray start --address` elsewhere.

Each node is a `ray start --block` process leading its own process group (GCS, raylet,
workers inherit it), so stopping the group stops every Ray process of that node and
nothing else on the machine (never `ray stop`, which stops every Ray on the host).
Rank 0 waits, bounded, until every rank's node is alive in the cluster (each node carries
a `retool_rank_<r>` resource) and names the ranks that are missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.cluster.layout import ClusterError, NodePorts, ClusterInfo, ray_address, ray_start_argv, ray_temp_dir
from runtime.cluster.rendezvous import ranks_text
from runtime.processes import group_members

PROBE_MODULE = "runtime.cluster.ray_probe"
STOP_GRACE_S = 20.0


def package_root() -> str:
    """Where retool's packages are importable from (Ray workers on every node need them)."""
    return str(Path(__file__).resolve().parents[2])


class RayNode:
    def __init__(self, info: ClusterInfo, ports: NodePorts, env: dict[str, str], log_path: Path,
                 cpu: tuple[int, int] | None) -> None:
        self.info, self.ports, self.log_path = info, ports, log_path
        self.temp_dir = ray_temp_dir(info, ports)
        root = package_root()
        path = env.get("PYTHONPATH", "")
        self.env = {**env, "RAY_AUTH_MODE": "disabled",
                    "PYTHONPATH": root + (os.pathsep + path if path else "")}
        self.argv = [sys.executable, "-m", "ray.scripts.scripts", *ray_start_argv(info, ports, self.temp_dir, cpu)[1:]]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return ray_address(self.info, self.ports)

    def start(self) -> None:
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(("[retool] $ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True, cwd=package_root())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the node's process group (Ray shuts down cleanly), SIGKILL what is left."""
        proc = self.proc
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            # the leader stays unreaped (a zombie) until the end, so its pid, and with it the
            # group id, cannot be given to another process while we still signal the group
            deadline = time.time() + grace_s
            while time.time() < deadline and group_members(proc.pid):
                time.sleep(0.2)
            if not group_members(proc.pid):
                break
        proc.wait()

    def wait_for_ranks(self, nodes: int, timeout_s: float) -> None:
        """(Rank 0.) Until ranks 0..N-1 are alive Ray nodes; ClusterError naming the missing ones."""
        argv = [sys.executable, "-m", PROBE_MODULE, self.address, str(nodes), str(timeout_s)]
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout_s + 120,
                                  cwd=package_root(), check=False)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"the Ray cluster at {self.address} did not answer within {timeout_s:g} s") from None
        present: list[int] = []
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                present = list(json.loads(line).get("ranks", []))
        missing = [r for r in range(nodes) if r not in present]
        if done.returncode != 0 or missing:
            detail = (done.stderr or "").strip().splitlines()[-3:]
            raise ClusterError(
                f"{ranks_text(missing or list(range(nodes)))} did not join the Ray cluster at {self.address} within "
                f"{timeout_s:g} s; a partial cluster never trains" + (f" ({' '.join(detail)})" if detail else "")
            )

