"""Modal functions run for real, as local processes ("containers"); clustered ones as N
processes on loopback.

`ClusterRunner.install(fake, [function names])` makes FakeModal's `spawn` of such a function
start one process, or N for one deployed with `cluster_size=N` (`@modal.clustered(size=N)`),
each calling the function the app registers (the deployed function's `entry` in
`runtime.modal.worker`, e.g. `run_stage(payload)`; only the SDK adapter it builds is this
container's local one) with its own cluster info (rank r, every container at 127.0.0.1,
one cluster id per attempt), the image's `env` steps, the function's env and its secrets in
its environment, and each volume as its own view
(tests/fakes/volume_views.py): the payload's mount path is the volume as Modal's servers
hold it (what the test reads), and every container gets a working copy of it, mapped into
its payload in place of the mount path. A container sees what another one wrote only after
that one's commit and its own reload; two commits of one file: the last one wins; a
container that dies loses what it had not committed; commit and reload refuse while a file
under the view is open in the container (modal 1.6.4). What it models of modal 1.6.4
(`modal.clustered` docs):

- the input is broadcast to every container; only rank 0's return value is the result;
- a container that dies (or fails) ends the attempt: the others are stopped, and while the
  function's `retries` allow, the whole cluster starts again (new cluster id), never the
  lost container alone; otherwise the call fails with that container's error.
  (Whether Modal restarts one container or all is not documented; the worker never
  trains a partial cluster either way, and tests/runtime/modal/test_cluster_roles.py
  covers a rank joining alone.)

Every process of a container carries `RETOOL_RUN_TAG=<container tag>` (inherited by
torchrun, Ray and their workers), so `kill(call_id, rank)` kills exactly one container,
and `close()` leaves nothing running. What a container asks of Modal's servers (`spawn`: a
segment handing over to the next; `poll`; the launch registry's Dict calls) is answered by
FakeModal in the test's process: the container leaves a request file, and the runner
answers it while the test (or the apply engine) polls the call.

With `own_root=True` every container runs in a root file system of its own
(tests/fakes/container_root.py): its views mounted at the volumes' mount paths and retool's
packages under /root, as on Modal, so the payload is passed unchanged and files naming
container paths mean the same inside. `serve(fake, [web functions])` runs a web endpoint
(the service sandbox) for real on loopback. `kills` and `stalls` act on an attempt when a
condition holds (a preemption after a committed checkpoint; commands stopped past a
segment's end), checked while its call is polled.

Fidelity limits: one host, so ports are shifted per rank (runtime.cluster.layout); without
`own_root` a container's mount paths differ from Modal's (its view's directory; the worker
only ever uses the paths its payload names, and a payload a container spawns is mapped
back), and RL's Ray workers on a member node get their paths from rank 0's driver, so they
write into rank 0's view (on Modal: their own node's); a container that asks something while
nobody polls its call waits (up to 10 minutes).

Run as `python -m tests.fakes.fake_cluster PAYLOAD RESULT`: the container side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.cluster.layout import PORT_BASE_ENV, ClusterInfo
from runtime.processes import RUN_TAG_ENV, tagged_processes, terminate_run

CLUSTER_ENV = "RETOOL_FAKE_CLUSTER"
CALL_ENV = "RETOOL_FAKE_CALL_ID"
OPS_ENV = "RETOOL_FAKE_OPS"
COMMIT_DELAY_ENV = "RETOOL_FAKE_COMMIT_DELAY"  # seconds a commit of this container takes to land
ENTRY_ENV = "RETOOL_FAKE_ENTRY"  # the deployed function's entry point in runtime.modal.worker
REQUESTS_ENV = "RETOOL_FAKE_REQUESTS"  # where a container asks FakeModal to spawn, and gets the answer
VIEWS_ENV = "RETOOL_FAKE_VIEWS"
WEB_PORT_ENV = "RETOOL_FAKE_WEB_PORT"  # a web endpoint's container serves its ASGI app here (loopback)
REMOTE_METHODS = ("spawn", "poll", "dict_get", "dict_put", "dict_pop")  # what a container may ask Modal  # volume name -> [its store (the mount path the test reads), this container's view]
REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Container:
    rank: int
    tag: str
    proc: subprocess.Popen[bytes]
    log: Path
    views: dict[str, list[str]]  # volume name -> [mount path (the store), this container's view]
    requests: Path
    mapped: bool = True  # the payload names the views' directories (False: the container has its own root)


@dataclass
class _Attempt:
    number: int
    cluster_id: str
    containers: list[_Container]
    result_path: Path


@dataclass
class ClusterRunner:
    root: Path  # payloads, results and container logs go here
    port_base: int
    device_env: Callable[[int], dict[str, str]] = field(default=lambda rank: {})
    # per rank: how long each of its commits takes to land (a slow upload: a member's last
    # shards reach the volume after rank 0's own commit)
    commit_delay_s: Callable[[int], float] = field(default=lambda rank: 0.0)
    teardown_grace_s: float = 60.0
    failures: list[str] = field(default_factory=list)  # which container ended each failed attempt
    attempts: dict[str, list[_Attempt]] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)  # tags of containers stopped with SIGSTOP
    # each container gets its own root file system (tests/fakes/container_root.py): volumes at
    # their mount paths, retool's packages under /root; the payload is passed as Modal passes it
    own_root: bool = False
    # (function, condition on (call, attempt number)): an attempt of a call of that function
    # whose condition holds is killed (once), as a preemption would, while its call is polled
    kills: list[tuple[str, Callable[[Any, int], bool]]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)  # "call id attempt N" of each kill made
    # (function, condition, seconds): the same, but the container's commands (every process but
    # the entry point's own) are stopped for that long: a step slower than the segment's time
    stalls: list[tuple[str, Callable[[Any, int], bool], float]] = field(default_factory=list)
    stalled: dict[str, float] = field(default_factory=dict)  # "call id attempt N" -> until (monotonic)
    web: dict[tuple[str, str], tuple[_Container, str]] = field(default_factory=dict)  # (app, fn) -> (container, url)

    def install(self, fake: Any, functions: list[str]) -> None:
        for name in functions:
            fake.handlers[name] = self.start
        self.fake = fake

    # ----------------------------------------------------------------- Modal's side

    def start(self, call: Any, fake: Any) -> Any:
        from tests.fakes.fake_modal import RUNNING

        fn = fake.deployed[call.app_name].function(call.function)
        self._launch(call, size=fn.cluster_size or 1)
        fake.watchers[call.call_id] = self.refresh
        return RUNNING

    def _launch(self, call: Any, size: int) -> None:
        number = len(self.attempts.get(call.call_id, [])) + 1
        cluster_id = f"cu-{call.call_id}-{number}"
        base = self.root / call.call_id / f"attempt-{number}"
        base.mkdir(parents=True, exist_ok=True)
        result_path = base / "result.json"
        app = self.fake.deployed[call.app_name]
        fn = app.function(call.function)
        image_env = _image_env(app)
        # Modal mounts the function's volumes (every entry point's); a bare test function
        # without any is given its volumes by the payload
        mounted = {name: mount for mount, name in fn.volumes.items()} or dict(call.payload.get("volumes") or {})
        containers: list[_Container] = []
        for rank in range(size):
            info = ClusterInfo(rank=rank, cluster_id=cluster_id, ips=["127.0.0.1"] * size,
                               ipv4_ips=["127.0.0.1"] * size)
            tag = f"fake-{call.call_id}-a{number}-r{rank}"
            # a new container starts with a fresh view of each volume (filled by its first reload)
            views = {name: [mount, str(base / f"views-{rank}" / name)] for name, mount in mounted.items()}
            stores = {name: [self._store(name, mount), work] for name, (mount, work) in views.items()}
            payload_path = base / f"payload-{rank}.json"
            payload_path.write_text(json.dumps(call.payload) if self.own_root else _mapped(json.dumps(call.payload), views))
            if self.own_root:  # the open-file check also looks at the mount path the container uses
                stores = {name: [*paths, views[name][0]] for name, paths in stores.items()}
            requests = base / f"requests-{rank}"
            requests.mkdir(exist_ok=True)
            env = {**os.environ, **image_env, **call.env, CLUSTER_ENV: info.model_dump_json(), CALL_ENV: call.call_id,
                   ENTRY_ENV: fn.entry, REQUESTS_ENV: str(requests),
                   RUN_TAG_ENV: tag, PORT_BASE_ENV: str(self.port_base), OPS_ENV: str(base / f"ops-{rank}.jsonl"),
                   VIEWS_ENV: json.dumps(stores), COMMIT_DELAY_ENV: str(self.commit_delay_s(rank)), "PYTHONPATH": str(REPO), **self.device_env(rank)}
            argv = [sys.executable, "-m", "tests.fakes.fake_cluster", str(payload_path), str(result_path)]
            if self.own_root:
                argv = self._rooted(app, base / f"root-{rank}", {mount: work for mount, work in views.values()}, argv, env)
            log = base / f"container-{rank}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            containers.append(_Container(rank, tag, proc, log, views, requests, mapped=not self.own_root))
        self.attempts.setdefault(call.call_id, []).append(_Attempt(number, cluster_id, containers, result_path))

    def _rooted(self, app: Any, root: Path, mounts: dict[str, str], argv: list[str], env: dict[str, str]) -> list[str]:
        """`argv` run in a root of its own (tests/fakes/container_root.py): the volumes at their
        mount paths, the image's local Python sources under /root (Modal's working directory,
        first on the path as in Modal's containers; this checkout after it, for the fake itself)."""
        from tests.fakes.container_root import RootSpec, command

        from tests.fakes.volume_views import DirVolume

        sources = {name: str(REPO / name) for step in app.image if step.op == "add_local_python_source"
                   for name in step.args}
        # what the fake's own side of the container reads and writes (its requests, payload and
        # result; the volume stores and their locks), visible inside at the same paths
        keep = {str(self.root), *(str(v.root.parent) for v in self.fake.volumes.values() if isinstance(v, DirVolume))}
        # and what the container's processes run (the image's Python and this checkout): a
        # checkout or venv under /tmp (as CI may place them) would otherwise vanish behind its own /tmp
        # (each as named and as resolved: a link is placed as a link, so its target must be there too)
        keep |= {str(q) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, REPO) for q in (Path(p), Path(p).resolve())}
        spec = root.with_suffix(".json")
        spec.write_text(RootSpec(root=str(root), mounts=mounts, sources=sources, tmp=str(root.with_name(root.name + "-tmp")),
                                 keep=sorted(keep)).model_dump_json())
        env["PYTHONPATH"] = f"/root:{REPO}"
        return command(spec, argv)

    # ----------------------------------------------------------------- web endpoints

    def serve(self, fake: Any, functions: list[str]) -> None:
        """Web endpoints (`@modal.asgi_app()`): the first `web_url` of one starts its container,
        the entry point's ASGI app served on a loopback port, and answers that port's URL."""
        for name in functions:
            fake.web_servers[name] = self.web_url
        self.fake = fake

    def web_url(self, app_name: str, function: str) -> str:
        running = self.web.get((app_name, function))
        if running is not None and running[0].proc.poll() is None:
            return running[1]
        app = self.fake.deployed[app_name]
        fn = app.function(function)
        port = free_port_base() + 7
        base = self.root / f"web-{app_name}-{function}-{port}"
        base.mkdir(parents=True, exist_ok=True)
        values: dict[str, str] = {}
        for secret in fn.secrets:
            values.update(self.fake.secrets[secret])
        image_env = _image_env(app)
        tag = f"fake-web-{function}-{port}"
        env = {**os.environ, **image_env, **fn.env, **values, ENTRY_ENV: fn.entry, WEB_PORT_ENV: str(port),
               RUN_TAG_ENV: tag, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "tests.fakes.fake_cluster", "--web"]
        if self.own_root:
            argv = self._rooted(app, base / "root", {}, argv, env)
        log = base / "container.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        container = _Container(0, tag, proc, log, {}, base)
        url = f"http://127.0.0.1:{port}"
        self.web[(app_name, function)] = (container, url)
        deadline = time.time() + 180
        while not _pings(url):
            if proc.poll() is not None or time.time() > deadline:
                self._stop_container(container)
                raise RuntimeError(f"web endpoint {function} did not start:\n{_tail(log)}")
            time.sleep(0.5)
        return url

    def _store(self, name: str, mount: str) -> str:
        """Where a volume's committed state is: FakeModal's directory for it (a DirVolume),
        else the mount path itself (a test that hands the payload host directories)."""
        from tests.fakes.volume_views import DirVolume

        volume = self.fake.volumes.get(name)
        return str(volume.root) if isinstance(volume, DirVolume) else mount

    def refresh(self, call: Any, event: str) -> None:
        """Called by FakeModal on poll/cancel: follow the current attempt's containers."""
        if call.state != "running":
            return
        attempt = self.attempts[call.call_id][-1]
        if event == "cancel":
            self._stop(attempt)
            return
        here = f"{call.call_id} attempt {attempt.number}"
        for function, when in self.kills:
            if call.function == function and here not in self.killed and when(call, attempt.number):
                self.killed.append(here)
                self.kill(call.call_id, 0)
        for function, when, seconds in self.stalls:
            if call.function == function and here not in self.stalled and when(call, attempt.number):
                self.stalled[here] = time.monotonic() + seconds
                self._signal_commands(attempt.containers[0], signal.SIGSTOP)
        if here in self.stalled and time.monotonic() >= self.stalled[here]:
            self._signal_commands(attempt.containers[0], signal.SIGCONT)
        for c in attempt.containers:
            self._answer(c)
        codes = [c.proc.poll() for c in attempt.containers]
        failed = [c for c, code in zip(attempt.containers, codes) if code not in (None, 0)]
        if failed:
            self.failures.append(f"{call.call_id} attempt {attempt.number}: " + ", ".join(
                f"rank {c.rank} exited with {c.proc.returncode}" for c in failed) + f" at {time.time():.0f}")
            # the survivors get a moment to notice on their own (the worker stops a cluster that
            # lost a rank) before the cluster is torn down
            deadline = time.time() + self.teardown_grace_s
            while time.time() < deadline and any(c.proc.poll() is None and c.tag not in self.frozen
                                                 for c in attempt.containers):
                time.sleep(0.2)
            self._stop(attempt)
            retries = self.fake.deployed[call.app_name].function(call.function).retries
            if len(self.attempts[call.call_id]) <= retries:  # the whole cluster starts again
                call.attempts += 1
                self._launch(call, size=len(attempt.containers))
                return
            first = failed[0]
            call.state, call.error = "failed", f"rank {first.rank} exited with {first.proc.returncode}: " + _tail(first.log)
            return
        if codes[0] == 0:
            # only rank 0's return value comes back; the others end with it
            deadline = time.time() + 60
            while time.time() < deadline and any(c.proc.poll() is None for c in attempt.containers):
                time.sleep(0.2)
            self._stop(attempt)
            call.state, call.result = "succeeded", json.loads(attempt.result_path.read_text())

    def _answer(self, c: _Container) -> None:
        """Answer what a container asked of Modal (REMOTE_METHODS) with FakeModal; a payload
        it spawns has its view paths mapped back to the mount paths."""
        for request in sorted(c.requests.glob("*.request.json")):
            answer = request.with_name(request.name.replace(".request.", ".answer."))
            if answer.exists():
                continue
            asked = json.loads(request.read_text())
            method, args, kwargs = asked["method"], list(asked["args"]), dict(asked["kwargs"])
            if method == "spawn" and c.mapped:
                unmapped = {name: [work, mount] for name, (mount, work) in c.views.items()}
                args[2] = json.loads(_mapped(json.dumps(args[2]), unmapped))
            try:
                value = getattr(self.fake, method)(*args, **kwargs) if method in REMOTE_METHODS else None
                out = {"value": value.model_dump(mode="json") if hasattr(value, "model_dump") else value}
            except Exception as exc:  # noqa: BLE001 - what the SDK would raise in the container
                out = {"error": f"{type(exc).__name__}: {exc}"}
            tmp = answer.with_suffix(".tmp")
            tmp.write_text(json.dumps(out))
            os.replace(tmp, answer)

    def _stop(self, attempt: _Attempt) -> None:
        for c in attempt.containers:
            self._stop_container(c)

    def _stop_container(self, c: _Container) -> None:
        if c.tag in self.frozen:  # a frozen host is gone: nothing in it handles SIGTERM
            self._kill(c)
            return
        # the container's own group only while it is unreaped: a reaped pid may already be
        # another process's (pids wrap quickly on a busy machine); its tag finds the rest
        terminate_run(c.proc.pid if c.proc.poll() is None else None, c.tag, grace_s=20.0)
        # a process forked while the sweep ran (a Ray worker being started) is caught here
        deadline = time.time() + 15
        while (left := tagged_processes(c.tag)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        c.proc.poll()

    # ----------------------------------------------------------------- test controls

    def kill(self, call_id: str, rank: int) -> None:
        """The container of `rank` dies at once (preemption, a lost host): every process in it."""
        self._kill(self.attempts[call_id][-1].containers[rank])

    def freeze(self, call_id: str, rank: int) -> None:
        """The container of `rank` stops answering without closing anything (a host that
        vanished without a FIN, a hung kernel): SIGSTOP to every process in it."""
        c = self.attempts[call_id][-1].containers[rank]
        self.frozen.add(c.tag)
        for pid in {*([c.proc.pid] if c.proc.poll() is None else []), *tagged_processes(c.tag)}:
            try:
                os.kill(pid, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                pass

    def _signal_commands(self, c: _Container, sig: int) -> None:
        """Signal every process of the container but its entry point's own (its commands)."""
        for pid in tagged_processes(c.tag):
            if pid != c.proc.pid:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _kill(self, c: _Container) -> None:
        for pid in {*([c.proc.pid] if c.proc.poll() is None else []), *tagged_processes(c.tag)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        c.proc.wait()

    def container_log(self, call_id: str, rank: int, attempt: int = -1, lines: int | None = 200) -> str:
        """The last `lines` lines of a container's output (None: all of it)."""
        path = self.attempts[call_id][attempt].containers[rank].log
        if lines is None:
            return path.read_text(errors="replace")
        return _tail(path, lines)

    def ops(self, call_id: str, rank: int, attempt: int = -1) -> list[list[str]]:
        path = self.attempts[call_id][attempt].result_path.parent / f"ops-{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def live_tags(self) -> list[str]:
        containers = [c for runs in self.attempts.values() for a in runs for c in a.containers]
        return [c.tag for c in [*containers, *(c for c, _ in self.web.values())] if tagged_processes(c.tag)]

    def close(self) -> None:
        for runs in self.attempts.values():
            for attempt in runs:
                self._stop(attempt)
        for container, _ in self.web.values():
            self._stop_container(container)


def free_port_base() -> int:
    """A port base whose first ports (rendezvous, torchrun, Ray GCS/client/dashboard) are free;
    the per-node ports above it are spread widely enough not to meet another run's."""
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1]) // 100 * 100
        if 20000 <= base <= 60000 and all(free(base + i) for i in range(5)):
            return base
    raise RuntimeError("no free port range on loopback")


def _mapped(payload_json: str, views: dict[str, list[str]]) -> str:
    """The payload as one container sees it: each mount path replaced by its view's directory."""
    for mount, work in sorted(views.values(), key=lambda mv: -len(mv[0])):
        payload_json = re.sub(r'(?<![\w./-])' + re.escape(mount.rstrip("/")) + r'(?=[/"\s]|$)', lambda _: work,
                              payload_json)
    return payload_json


def _image_env(app: Any) -> dict[str, str]:
    """The environment the app's image sets (its `env` steps, in order)."""
    return {k: v for step in app.image if step.op == "env" for k, v in step.env.items()}


def _pings(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v1/ping", timeout=5) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the container side


class ContainerAdapter:
    """What `runtime.modal.worker` asks Modal from inside a container, answered locally."""

    def __init__(self) -> None:
        from tests.fakes.volume_views import VolumeStore, VolumeView

        self.info = ClusterInfo.model_validate_json(os.environ[CLUSTER_ENV])
        self.ops_path = Path(os.environ[OPS_ENV])
        paths = json.loads(os.environ.get(VIEWS_ENV, "{}"))  # name -> [store, view(, mount path)]
        self.views = {name: VolumeView(VolumeStore(Path(p[0])), Path(p[1])) for name, p in paths.items()}
        self.mounts = {name: Path(p[2]) for name, p in paths.items() if len(p) > 2}
        self.commit_delay_s = float(os.environ.get(COMMIT_DELAY_ENV) or 0.0)
        for view in self.views.values():  # mounted: the volume as last committed
            view.reload()

    def _record(self, *op: str) -> None:
        with self.ops_path.open("a") as fh:
            fh.write(json.dumps([*op, time.time()]) + "\n")

    def reload_volume(self, name: str) -> None:
        self._record("reload_volume", name)
        self._refuse_open_files(name)
        self.views[name].reload()

    def commit_volume(self, name: str) -> None:
        time.sleep(self.commit_delay_s)
        self.views[name].commit(reload=False)
        self._record("commit_volume", name)
        self._refuse_open_files(name)  # modal 1.6.4: commit() reloads after committing
        self.views[name].reload()

    def _refuse_open_files(self, name: str) -> None:
        from tests.fakes.fake_modal import open_files_under

        found = open_files_under(self.views[name].work)
        if not found and name in self.mounts:  # its own root: the container opens files at the mount path
            found = open_files_under(self.mounts[name])
        if found:
            self._record("refused_open_files", name, found[0])
            raise RuntimeError(f"there are open files preventing the operation: {found[0]} is open")

    def current_call_id(self) -> str | None:
        return os.environ.get(CALL_ENV)

    def cluster_info(self) -> ClusterInfo:
        return self.info

    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Ask FakeModal in the test's process (answered while the test polls this call)."""
        self._record(method, *[a for a in args if isinstance(a, str)])
        requests = Path(os.environ[REQUESTS_ENV])
        n = len(list(requests.glob("*.request.json")))
        request = requests / f"{n:04d}.request.json"
        tmp = request.with_suffix(".tmp")
        tmp.write_text(json.dumps({"method": method, "args": list(args), "kwargs": kwargs}))
        os.replace(tmp, request)
        answer = requests / f"{n:04d}.answer.json"
        deadline = time.time() + 600
        while not answer.exists():
            if time.time() > deadline:
                raise TimeoutError(f"{method}: Modal did not answer in 600 s (is the test polling the call?)")
            time.sleep(0.2)
        out = json.loads(answer.read_text())
        if "error" in out:
            raise RuntimeError(out["error"])
        return out["value"]

    def spawn(self, app_name: str, function: str, payload: dict[str, Any], *, env: str | None = None) -> str:
        return str(self._ask("spawn", app_name, function, payload, env=env))

    def poll(self, call_id: str) -> Any:
        from runtime.modal.adapter import CallOutcome

        return CallOutcome.model_validate(self._ask("poll", call_id))

    def dict_get(self, name: str, key: str, *, env: str | None = None) -> str | None:
        value = self._ask("dict_get", name, key, env=env)
        return None if value is None else str(value)

    def dict_put(self, name: str, key: str, value: str, *, skip_if_exists: bool = False, env: str | None = None) -> bool:
        return bool(self._ask("dict_put", name, key, value, skip_if_exists=skip_if_exists, env=env))

    def dict_pop(self, name: str, key: str, *, env: str | None = None) -> str | None:
        value = self._ask("dict_pop", name, key, env=env)
        return None if value is None else str(value)


def serve_web() -> int:
    """A web endpoint's container: the entry point's ASGI app on its loopback port."""
    import uvicorn

    from runtime.modal import worker

    app = getattr(worker, os.environ[ENTRY_ENV])()
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ[WEB_PORT_ENV]), log_level="warning")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--web"]:
        return serve_web()
    from runtime.modal import worker

    adapter = ContainerAdapter()
    worker._adapter = lambda: adapter  # type: ignore[assignment,return-value]  # the SDK's, in a real container
    entry = getattr(worker, os.environ.get(ENTRY_ENV) or "run_stage")
    result = entry(json.loads(Path(argv[0]).read_text()))
    if adapter.info.rank == 0:
        tmp = Path(argv[1]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
