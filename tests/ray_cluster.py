"""A real Ray cluster on loopback for the Ray backend's tests: a head (`ray start --head`)
and a worker node (`ray start --address`) with its own resources, each a `ray start
--block` in its own process group, and a temporary folder as the shared storage. Stopping
kills exactly those process groups (and processes started under this cluster's temp dir),
never `ray stop`, never by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 180.0


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this process (the OS may offer one twice, and
    Ray refuses two of a node's servers on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class RayCluster:
    def __init__(self, *, head_cpus: int = 4, worker_cpus: int = 4, worker_gpus: int = 0) -> None:
        # Ray's socket paths must stay short: a temp dir directly under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
        self.temp_dir = self.root / "t"
        self.storage = self.root / "storage"
        self.storage.mkdir()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.head_cpus, self.worker_cpus, self.worker_gpus = head_cpus, worker_cpus, worker_gpus
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @staticmethod
    def node_ports() -> list[str]:
        """Free ports for a node's own servers: Ray's defaults (e.g. the job agent's 52365)
        would collide with any other Ray on this host, and then jobs cannot be submitted."""
        return [f"--{opt}={free_port()}" for opt in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port",
        )]

    def _start(self, name: str, args: list[str]) -> None:
        args = [*args, *self.node_ports()]
        log = open(self.root / f"{name}.log", "ab")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )

    def start(self) -> RayCluster:
        self.start_head()
        self.start_worker()
        self.wait_for_nodes(2)
        return self

    def start_head(self) -> None:
        self._start("head", [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", f"--num-cpus={self.head_cpus}",
            "--num-gpus=0", f"--ray-client-server-port={free_port()}",
        ])

    def start_worker(self) -> None:
        self._start("worker", [
            f"--address={self.gcs}", f"--num-cpus={self.worker_cpus}", f"--num-gpus={self.worker_gpus}",
            '--resources={"retool_test_worker": 1}',
        ])

    def add_node(self, name: str, *, cpus: int, gpus: int) -> None:
        """Another worker node joins the running cluster (as an autoscaler's would)."""
        self._start(name, [f"--address={self.gcs}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"])
        self.wait_for_nodes(len(self.procs))

    def wait_for_nodes(self, count: int) -> None:
        from ray.util.state import list_nodes

        deadline = time.time() + START_TIMEOUT_S
        last: object = None
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray {name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            try:
                alive = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], timeout=5)
                if len(alive) >= count:
                    return
                last = alive
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not come up: {last}")

    def stop_node(self, name: str, graceful: bool = True) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0))[0 if graceful else 1:]:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline and _group_alive(proc.pid):
                proc.poll()  # reap the group's leader: a zombie keeps the group "alive"
                time.sleep(0.2)
            if not _group_alive(proc.pid):
                break
        proc.wait(timeout=10)

    def stop(self) -> None:
        """Tear the cluster down at once: every test has checked what it needed by now, so its
        jobs and nodes are killed, not stopped gracefully (that took ~40 s a cluster)."""
        for name in list(self.procs)[::-1]:
            self.stop_node(name, graceful=False)
        # Job entrypoints and workers run in sessions of their own: stop those started for
        # this cluster (their command line or environment names its temp dir).
        for pid in _processes_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _processes_mentioning(text: str) -> list[int]:
    needle = text.encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob:
            found.append(int(entry.name))
    return found


def running(**options: int) -> Iterator[RayCluster]:
    """A started cluster for a fixture to yield (`yield from running()`), stopped after."""
    cluster = RayCluster(**options)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
