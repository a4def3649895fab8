"""An in-memory Modal behind the `runtime.modal.adapter.ModalAdapter` protocol.

It models what retool relies on, with Modal's own rules (docs/modal.md):

- credentials: with no token every remote call raises `TerminalError` at once (the SDK's
  AuthError, translated the way `SdkAdapter` does); `reachable=False` makes every remote
  call raise `ModalUnreachable` (what `SdkAdapter`'s deadline raises);
- volumes: trees of files (`{path: bytes}`, directories implied by paths); `listdir`,
  `read_file` and `remove` of a missing path raise the built-in FileNotFoundError (modal
  1.6.4's `remove_file` converts the server's NotFoundError to it), `remove` of a non-empty
  directory needs `recursive`; reads on a volume that does not exist raise
  FileNotFoundError, uploads raise `VolumeNotFound` (the SDK's NotFoundError, translated);
- dicts: `put(skip_if_exists=True)` is an atomic put-if-absent; entries expire after
  7 days without a read or write (clock injectable);
- deploy: rejects what Modal's servers reject — build steps after `add_local_python_source`,
  GPU types or counts outside Modal's documented list (`runtime.modal.limits`, case-insensitive
  like the client), timeouts over 24 h, bad function names, secrets or volumes that do not
  exist; it records every definition deployed;
- calls: `spawn` needs a deployed app and function and returns an `fc-…` id; a call runs
  until the test finishes it (`complete`, `fail`, `preempt`...) or a registered handler
  (the container's behaviour) returns; `poll` is `get(timeout=0)`: running, succeeded,
  failed, terminated (`cancel`: Modal's TERMINATED status), expired (results expire) or lost
  (`lose`: Modal's InternalFailure). `poll` raises what modal 1.6.4's `FunctionCall.get`
  raises in that state (the real `modal.exception` types: the built-in TimeoutError while
  running, OutputExpiredError for an expired or unknown id, RemoteError for a terminated call,
  the function's own exception...) and classifies it with the adapter's own `call_outcome`,
  as `SdkAdapter` does; `conflicts=N` makes the next N polls answer ConflictError;
  `lost_spawn_answers=N` makes the next N spawns start
  their call and then raise `ModalUnreachable` (the answer missed the adapter's deadline);
- the container side (reload, commit, cluster info, current call id) is recorded (with a
  volume's mount in `mounts`, `reload_volume` raises RuntimeError while a file under it is
  open in this process or its children, and `commit_volume` reloads after committing, so it
  raises too: modal 1.6.4 `Volume.reload`/`commit`, "there are open files preventing the
  operation"); a volume in `views` is this container's own working copy of a volume store
  (tests/fakes/volume_views.py): others' writes appear only after their commit and this
  container's reload, and concurrent commits of one file keep the last;
- clustered functions (`cluster_size=N`) need GPUs; tests/fakes/fake_cluster.py runs them
  for real as N local processes (and any other function as one), calling the registered
  entry point; with `volume_root` the volumes are directories those processes share.

Fidelity limits: no image is built (steps are checked, not run); a spawned call does not
run the real worker unless a handler does (tests/fakes/fake_cluster.py's); with `ClusterRunner.serve` a web endpoint runs for
real on loopback (else no web traffic reaches it); the simulated `Containers` below write straight
into the committed volume (as if each write were committed at once; the real worker runs on
per-container views, here with `views` and in tests/fakes/fake_cluster.py); no logs.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import TerminalError
from runtime.cluster.layout import ClusterInfo
from runtime.modal.adapter import (
    LOGIN_HINT, CallOutcome, CallState, FunctionStats, ModalUnreachable, UploadProgress, UploadProgressFn, VolumeEntry,
    VolumeNotFound, call_outcome, require_web_url, upload_plan,
)
from runtime.modal.limits import gpu_problem
from runtime import records
from runtime.modal.models import AppDefinition
from runtime.records import StageProgress, StageResult, StageRun
from runtime.stage_kinds import KINDS
from runtime.verl.kind import TrainingKind
from tests.fakes.volume_views import DirVolume, VolumeView

DICT_TTL_S = 7 * 24 * 3600
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9-_.]{1,64}$")


class FakeModalError(Exception):
    """What the SDK would raise for a request Modal's servers reject (InvalidError, NotFoundError)."""


class _RemoteException(Exception):
    """The function's own exception, as `_process_result` re-raises it on the caller's side."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Running:
    """A handler returns RUNNING to leave its call running."""


RUNNING = _Running()


@dataclass
class FakeCall:
    call_id: str
    app_name: str
    function: str
    payload: dict[str, Any]
    env: dict[str, str]  # what the container would see from its secrets
    state: CallState = "running"
    result: Any = None
    error: str = ""
    attempts: int = 1


Handler = Callable[[FakeCall, "FakeModal"], Any]


@dataclass
class FakeModal:
    token: bool = True
    reachable: bool = True
    unreachable_ops: set[str] = field(default_factory=set)  # a partial outage: these calls time out
    workspace: str = "acme"
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # Modal secret name -> values
    rates: dict[str, float] | None = None  # billing rates (USD/GPU-hour); None: the API is unavailable
    clock: Callable[[], float] = field(default=lambda: 0.0)
    call_id_in_container: str | None = None
    cluster: ClusterInfo = field(default_factory=lambda: ClusterInfo(rank=0))  # what cluster_info() answers in a container

    volumes: dict[str, MutableMapping[str, bytes]] = field(default_factory=dict)
    mounts: dict[str, Path] = field(default_factory=dict)  # in a container: volume name -> its mount here
    # in a container: volume name -> this container's own view of it (tests/fakes/volume_views.py);
    # a volume with a view syncs with its store only on reload/commit
    views: dict[str, VolumeView] = field(default_factory=dict)
    # where volumes live as directories (tests/fakes/volume_views.py DirVolume), so processes
    # (the real container entry points, tests/fakes/fake_cluster.py) share them; None: in memory
    volume_root: Path | None = None
    lost_spawn_answers: int = 0  # the next N spawns start their call, then raise ModalUnreachable
    clusters_enabled: bool = True  # multi-node clusters are in preview: access on request
    fail_upload_after: int | None = None  # the next data upload breaks after this many files
    conflicts: int = 0  # the next N polls answer ConflictError (gRPC ABORTED), as Modal may
    images_built: list[list[Any]] = field(default_factory=list)
    on_commit: Callable[[str], None] | None = None  # test hook: called with the volume name on each commit
    dicts: dict[str, dict[str, tuple[str, float]]] = field(default_factory=dict)  # key -> (value, last access)
    deployed: dict[str, AppDefinition] = field(default_factory=dict)
    deploys: list[AppDefinition] = field(default_factory=list)
    calls: dict[str, FakeCall] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)  # function name -> container behaviour
    # call id -> follows a call's containers on poll/cancel (tests/fakes/fake_cluster.py)
    watchers: dict[str, Callable[[FakeCall, str], None]] = field(default_factory=dict)
    # web function name -> serves it for real and answers its URL (tests/fakes/fake_cluster.py `serve`)
    web_servers: dict[str, Callable[[str, str], str]] = field(default_factory=dict)
    ops: list[tuple[str, ...]] = field(default_factory=list)  # every adapter call, in order
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    # ----------------------------------------------------------------- plumbing

    def _remote(self, *op: str) -> None:
        self.ops.append(op)
        if not self.token:
            raise TerminalError(self.credentials_problem() or "", "", LOGIN_HINT)
        if not self.reachable or op[0] in self.unreachable_ops:
            raise ModalUnreachable(f"Modal did not answer within 20 s ({op[0]})")

    def ops_named(self, name: str) -> list[tuple[str, ...]]:
        return [op for op in self.ops if op[0] == name]

    # ----------------------------------------------------------------- credentials

    def credentials_problem(self) -> str | None:
        return None if self.token else "No Modal credentials: no token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ~/.modal.toml"

    def check_connection(self, timeout_s: float = 20.0) -> None:
        self._remote("check_connection")

    # ----------------------------------------------------------------- volumes

    def _vol(self, name: str) -> dict[str, bytes]:
        if name not in self.volumes:
            raise FileNotFoundError(f"volume {name} not found")
        return self.volumes[name]

    def volume_exists(self, name: str, *, env: str | None = None) -> bool:
        self._remote("volume_exists", name)
        return name in self.volumes

    def create_volume(self, name: str, *, env: str | None = None) -> bool:
        self._remote("create_volume", name)
        if name in self.volumes:
            return False
        self.volumes[name] = DirVolume(self.volume_root / name) if self.volume_root is not None else {}
        return True

    def delete_volume(self, name: str, *, env: str | None = None) -> bool:
        self._remote("delete_volume", name)
        return self.volumes.pop(name, None) is not None

    def listdir(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> list[VolumeEntry]:
        self._remote("listdir", volume, path)
        files = self._vol(volume)
        prefix = path.strip("/")
        if prefix and prefix in files:  # a file: its own entry
            return [VolumeEntry(path=prefix, is_dir=False, size=len(files[prefix]))]
        entries: dict[str, VolumeEntry] = {}
        for fpath, data in files.items():
            if prefix and not fpath.startswith(prefix + "/"):
                continue
            rel = PurePosixPath(fpath[len(prefix) + 1:] if prefix else fpath)
            parts = rel.parts
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts)) + 1):
                sub = "/".join(parts[:i])
                full = f"{prefix}/{sub}" if prefix else sub
                is_dir = i < len(parts)
                entries.setdefault(full, VolumeEntry(path=full, is_dir=is_dir, size=0 if is_dir else len(data)))
        if prefix and not entries:
            raise FileNotFoundError(f"{volume}:{path}")
        return sorted(entries.values(), key=lambda e: e.path)

    def read_file(self, volume: str, path: str, *, env: str | None = None) -> bytes:
        self._remote("read_file", volume, path)
        files = self._vol(volume)
        key = path.strip("/")
        if key not in files:
            raise FileNotFoundError(f"{volume}:{path}")
        return files[key]

    def upload_data(self, volume: str, remote_dir: str, local: Path, *, env: str | None = None,
                    progress: UploadProgressFn | None = None) -> None:
        """File by file like `SdkAdapter.upload_data`; `fail_upload_after=N` makes the upload
        break after N files (the connection dropped), leaving those N on the volume."""
        self._remote("upload_data", volume, remote_dir)
        if volume not in self.volumes:
            raise VolumeNotFound(f"Modal volume {volume} does not exist")
        plan = upload_plan(local)
        total, done = sum(f.stat().st_size for _, f in plan), 0
        for i, (rel, path) in enumerate(plan, start=1):
            if self.fail_upload_after is not None and i > self.fail_upload_after:
                self.fail_upload_after = None
                raise ModalUnreachable(f"the connection dropped while uploading {rel}")
            self.volumes[volume][f"{remote_dir.strip('/')}/{rel}"] = path.read_bytes()
            done += path.stat().st_size
            if progress is not None:
                progress(UploadProgress(files_done=i, files_total=len(plan), bytes_done=done, bytes_total=total,
                                        current=rel))

    def put_files(self, volume: str, files: Mapping[str, bytes | Path], *, env: str | None = None) -> None:
        self._remote("put_files", volume, *sorted(files))
        if volume not in self.volumes:
            raise VolumeNotFound(f"Modal volume {volume} does not exist")
        target = self.volumes[volume]
        for remote, data in files.items():
            key = remote.strip("/")
            if isinstance(data, Path):
                if data.is_dir():
                    for f in sorted(data.rglob("*")):
                        if f.is_file():
                            target[f"{key}/{f.relative_to(data).as_posix()}"] = f.read_bytes()
                    continue
                data = data.read_bytes()
            target[key] = bytes(data)

    def remove(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> None:
        self._remote("remove", volume, path)
        files = self._vol(volume)
        key = path.strip("/")
        under = [f for f in files if f.startswith(key + "/")]
        if key not in files and not under:
            raise FileNotFoundError(f"{volume}:{path}")
        if under and not recursive:
            raise FakeModalError(f"InvalidError: {path} is a non-empty directory (pass recursive=True)")
        for f in under:
            del files[f]
        files.pop(key, None)

    # test helpers (not part of the protocol)
    def write(self, volume: str, path: str, data: bytes | str) -> None:
        self.volumes.setdefault(volume, {})[path.strip("/")] = data.encode() if isinstance(data, str) else data

    def tree(self, volume: str) -> list[str]:
        return sorted(self.volumes.get(volume, {}))

    # ----------------------------------------------------------------- dicts

    def _entries(self, name: str) -> dict[str, tuple[str, float]]:
        entries = self.dicts.setdefault(name, {})
        now = self.clock()
        for key in [k for k, (_, t) in entries.items() if now - t > DICT_TTL_S]:
            del entries[key]  # idle entries expire (Modal: 7 days without a read or write)
        return entries

    def dict_put(self, name: str, key: str, value: str, *, skip_if_exists: bool = False, env: str | None = None) -> bool:
        self._remote("dict_put", name, key)
        entries = self._entries(name)
        if skip_if_exists and key in entries:
            return False
        entries[key] = (str(value), self.clock())
        return True

    def dict_get(self, name: str, key: str, *, env: str | None = None) -> str | None:
        self._remote("dict_get", name, key)
        entries = self._entries(name)
        if key not in entries:
            return None
        value, _ = entries[key]
        entries[key] = (value, self.clock())
        return value

    def dict_pop(self, name: str, key: str, *, env: str | None = None) -> str | None:
        self._remote("dict_pop", name, key)
        item = self._entries(name).pop(key, None)
        return None if item is None else item[0]

    # ----------------------------------------------------------------- app

    def deploy(self, definition: AppDefinition) -> None:
        self._remote("deploy", definition.app_name)
        self._validate(definition)
        if not self.clusters_enabled and any(fn.cluster_size for fn in definition.functions):
            # what Modal answers a workspace without multi-node access is not documented: a guess
            raise FakeModalError("InvalidError: multi-node clusters are not enabled for this workspace")
        self.deployed[definition.app_name] = definition
        self.deploys.append(definition)

    def stop_app(self, app_name: str, *, env: str | None = None) -> None:
        self._remote("stop_app", app_name)
        self.deployed.pop(app_name, None)

    def _validate(self, d: AppDefinition) -> None:
        ops = [s.op for s in d.image]
        if not ops or ops[0] != "from_registry":
            raise FakeModalError("InvalidError: the image chain must start from a registry image")
        if "add_local_python_source" in ops and ops.index("add_local_python_source") != len(ops) - 1:
            raise FakeModalError(
                "InvalidError: An image tried to run a build step after using `image.add_local_*` to include local files"
            )
        for fn in d.functions:
            if not FUNCTION_NAME_RE.match(fn.name):
                raise FakeModalError(f"InvalidError: invalid function name {fn.name!r}")
            if fn.timeout_s > 86400:
                raise FakeModalError(f"InvalidError: timeout {fn.timeout_s}s of {fn.name} exceeds 24 hours")
            for gpu in [fn.gpu] if isinstance(fn.gpu, str) else (fn.gpu or []):
                why = gpu_problem(gpu)  # Modal's documented types and counts
                if why:
                    raise FakeModalError(f"InvalidError: {why}")
            for secret in fn.secrets:
                if secret not in self.secrets:
                    raise FakeModalError(f"NotFoundError: Secret {secret!r} not found")
            if fn.cluster_size and fn.cluster_size > 1 and not fn.gpu:
                # modal.clustered: "each container must request all GPUs on its host; CPU-only clusters are not supported"
                raise FakeModalError(f"InvalidError: clustered function {fn.name} must request GPUs")
            for name in fn.volumes.values():
                if name not in self.volumes:
                    raise FakeModalError(f"NotFoundError: Volume {name!r} not found")

    def spawn(self, app_name: str, function: str, payload: dict[str, Any], *, env: str | None = None) -> str:
        self._remote("spawn", app_name, function)
        app = self.deployed.get(app_name)
        if app is None:
            raise FakeModalError(f"NotFoundError: App {app_name!r} is not deployed")
        fn = app.function(function)
        values: dict[str, str] = {}
        for secret in fn.secrets:
            values.update(self.secrets[secret])
        call = FakeCall(f"fc-{next(self._ids):06d}", app_name, function, payload, {**fn.env, **values})
        self.calls[call.call_id] = call
        self._run_handler(call)
        if self.lost_spawn_answers > 0:  # the call exists; its id never reaches the caller
            self.lost_spawn_answers -= 1
            raise ModalUnreachable(f"Modal did not answer within 60 s (spawn {app_name}.{function})")
        return call.call_id

    def _run_handler(self, call: FakeCall) -> None:
        handler = self.handlers.get(call.function)
        if handler is None:
            return
        try:
            value = handler(call, self)
        except Exception as exc:  # noqa: BLE001 - the container's failure
            call.state, call.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        if not isinstance(value, _Running):
            call.state, call.result = "succeeded", value

    def _call(self, call_id: str) -> FakeCall | None:
        return self.calls.get(call_id)

    def poll(self, call_id: str) -> CallOutcome:
        self._remote("poll", call_id)
        call = self._call(call_id)
        if call is not None and call_id in self.watchers:
            self.watchers[call_id](call, "poll")
        if call is not None and call.state == "succeeded":
            return CallOutcome(state="succeeded", result=call.result)
        import modal.exception as exc_mod

        try:
            raise self._sdk_exception(exc_mod, call)
        except BaseException as exc:  # noqa: BLE001 - classified exactly as SdkAdapter does
            return call_outcome(exc_mod, exc, call_id)

    def _sdk_exception(self, exc_mod: Any, call: FakeCall | None) -> BaseException:
        """What modal 1.6.4's `FunctionCall.get(timeout=0)` raises for a call in this state."""
        if self.conflicts > 0:
            self.conflicts -= 1
            return exc_mod.ConflictError("conflict")
        if call is None or call.state == "expired":
            return exc_mod.OutputExpiredError()  # no outputs, no unfinished inputs
        if call.state == "running":
            return builtins.TimeoutError()
        if call.state == "lost":
            return exc_mod.InternalFailure(call.error or "internal failure")
        if call.state in ("terminated", "cancelled"):
            return exc_mod.RemoteError(call.error or "Function call was terminated")
        if call.error.startswith("timed out"):
            return exc_mod.FunctionTimeoutError(call.error.removeprefix("timed out: "))
        return _RemoteException(call.error)  # the function's own exception, re-raised

    def wait(self, call_id: str, timeout_s: float) -> CallOutcome:
        """`get(timeout=timeout_s)`: a call that real containers run (a watcher follows it) is
        waited for up to the timeout; a simulated one answers at once."""
        import time

        deadline = time.monotonic() + timeout_s
        outcome = self.poll(call_id)
        while outcome.state == "running" and call_id in self.watchers and time.monotonic() < deadline:
            time.sleep(0.5)
            outcome = self.poll(call_id)
        return outcome

    def cancel(self, call_id: str) -> None:
        self._remote("cancel", call_id)
        call = self._call(call_id)
        if call is not None and call.state == "running":
            if call_id in self.watchers:
                self.watchers[call_id](call, "cancel")  # terminate_containers=True
            call.state, call.error = "terminated", "Function call was cancelled (terminated)"

    def function_stats(self, app_name: str, function: str, *, env: str | None = None) -> FunctionStats:
        self._remote("function_stats", app_name, function)
        if app_name not in self.deployed:
            return FunctionStats()  # SdkAdapter: no such function, nothing queued for it
        running = len(self.running_calls(function))
        return FunctionStats(backlog=running, runners=running)

    def secret_problem(self, name: str, keys: list[str], *, env: str | None = None) -> str | None:
        self._remote("secret_problem", name)
        if name not in self.secrets:
            return f"Secret '{name}' not found in environment '{env or 'main'}'"
        missing = [k for k in keys if k not in self.secrets[name]]
        return f"Secret '{name}' is missing keys {', '.join(missing)}" if missing else None

    def build_image_now(self, steps: list[Any], *, env: str | None = None) -> str:
        self._remote("build_image_now", env or "")
        probe = AppDefinition(app_name="image-build", image=steps, functions=[])
        self._validate(probe)
        self.images_built.append(list(steps))
        return f"im-{len(self.images_built):06d}"

    def web_url(self, app_name: str, function: str, *, env: str | None = None) -> str:
        self._remote("web_url", app_name, function)
        app = self.deployed.get(app_name)
        if app is None:
            raise FakeModalError(f"NotFoundError: App {app_name!r} is not deployed")
        # modal 1.6.4: get_web_url() is None for a function that is not a web endpoint
        url = f"https://{self.workspace}--{app_name}-{function}.modal.run" if app.function(function).web else None
        if url is not None and function in self.web_servers:  # served for real, on loopback
            url = self.web_servers[function](app_name, function)
        return require_web_url(url, app_name, function)

    def gpu_rates(self) -> dict[str, float]:
        self._remote("gpu_rates")
        if self.rates is None:
            raise ModalUnreachable("billing rates are not available")
        return dict(self.rates)

    # test controls for calls
    def complete(self, call_id: str, result: Any) -> None:
        self.calls[call_id].state, self.calls[call_id].result = "succeeded", result

    def fail(self, call_id: str, error: str) -> None:
        self.calls[call_id].state, self.calls[call_id].error = "failed", error

    def expire(self, call_id: str) -> None:
        self.calls[call_id].state, self.calls[call_id].result = "expired", None

    def lose(self, call_id: str) -> None:
        """Modal lost the input (InternalFailure after its retries)."""
        self.calls[call_id].state, self.calls[call_id].result = "lost", None

    def preempt(self, call_id: str) -> None:
        """The container died; Modal restarts the same input (the call stays running)."""
        call = self.calls[call_id]
        call.attempts += 1
        self._run_handler(call)

    def running_calls(self, function: str | None = None) -> list[FakeCall]:
        return [c for c in self.calls.values() if c.state == "running" and function in (None, c.function)]

    # ----------------------------------------------------------------- container side

    def reload_volume(self, name: str) -> None:
        self.ops.append(("reload_volume", name))
        self._refuse_open_files(name)
        if name in self.views:
            self.views[name].reload()

    def commit_volume(self, name: str) -> None:
        self.ops.append(("commit_volume", name))
        if self.on_commit is not None:
            self.on_commit(name)
        if name in self.views:
            self.views[name].commit(reload=False)
        self._refuse_open_files(name)  # modal 1.6.4: commit() reloads after committing
        if name in self.views:
            self.views[name].reload()

    def _refuse_open_files(self, name: str) -> None:
        mount = self.mounts.get(name) or (self.views[name].work if name in self.views else None)
        if mount is None:
            return
        found = open_files_under(mount)
        if found:
            self.ops.append(("refused_open_files", name, found[0]))
            raise RuntimeError(f"there are open files preventing the operation: {found[0]} is open")

    def current_call_id(self) -> str | None:
        return self.call_id_in_container

    def cluster_info(self) -> ClusterInfo:
        return self.cluster


def open_files_under(root: Path) -> list[str]:
    """Files under `root` held open by this process or its descendants (Linux /proc)."""
    root = Path(root).resolve()
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    found: list[str] = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = Path(os.readlink(fd))
            except OSError:
                continue
            if target.is_absolute() and target.is_relative_to(root):
                found.append(str(target))
    return sorted(set(found))


# --------------------------------------------------------------------------- simulated containers


def volume_path(payload: dict[str, Any], container_path: str) -> tuple[str, str]:
    """(Modal volume name, path inside it) of a container path, from the payload's mounts."""
    for name, mnt in sorted(payload["volumes"].items(), key=lambda kv: -len(kv[1])):
        if container_path == mnt or container_path.startswith(mnt.rstrip("/") + "/"):
            return name, container_path[len(mnt):].lstrip("/")
    raise KeyError(container_path)


@dataclass
class Containers:
    """What retool's functions do in their containers, simulated on the fake's volumes:
    `prepare` writes a dataset/model, `stage-*` writes verl checkpoints (all shards of its
    world size, then the tracker) every `save_freq` steps or, for an eval stage, the eval
    runner's samples, progress and results; `finalize` writes a merged model.

    `steps_per_call`: how far one stage call trains before its segment ends (then it spawns
    the next segment, as the real worker does); None trains to the end. `hold`: stage calls
    stay running until `advance(call_id)` is called."""

    save_freq: int = 62
    steps_per_call: int | None = None
    hold: bool = False
    rows: int = 2000
    eval_problems: int = 3
    seen_env: list[dict[str, str]] = field(default_factory=list)
    drawn: list[int] = field(default_factory=list)  # samples each eval call drew

    def install(self, fake: FakeModal, stage_functions: list[str]) -> None:
        fake.handlers["prepare"] = self.prepare
        fake.handlers["finalize"] = self.finalize
        for name in stage_functions:
            fake.handlers[name] = self.stage

    def prepare(self, call: FakeCall, fake: FakeModal) -> Any:
        p = call.payload
        vol, rel = volume_path({"volumes": {p["volume"]: p["out_dir"].rsplit("/", 2)[0]}}, p["out_dir"])
        if p["kind"] == "dataset":
            fake.write(vol, f"{rel}/train.parquet", b"PAR1" + p["name"].encode())
            fake.write(vol, f"{rel}/meta.json", json.dumps({"rows": self.rows}))
            return {"path": f"{p['out_dir']}/train.parquet", "digest": f"d-{p['name']}", "rows": self.rows,
                    "columns": ["messages"], "skipped": 0}
        fake.write(vol, f"{rel}/config.json", "{}")
        return {"path": p["out_dir"], "digest": f"m-{p['name']}"}

    def stage(self, call: FakeCall, fake: FakeModal) -> Any:
        self.seen_env.append(dict(call.env))
        if self.hold:
            return RUNNING
        return self.train(call, fake)

    def advance(self, fake: FakeModal, call_id: str) -> None:
        call = fake.calls[call_id]
        try:
            call.result, call.state = self.train(call, fake), "succeeded"
        except Exception as exc:  # noqa: BLE001
            call.state, call.error = "failed", str(exc)

    def train(self, call: FakeCall, fake: FakeModal) -> dict[str, Any]:
        p = call.payload
        stage_kind = KINDS[p["kind"]]
        if not isinstance(stage_kind, TrainingKind):  # the eval runner: samples, not checkpoints
            return self.evaluate(call, fake)
        vol, rel = volume_path(p, p["checkpoint_dir"])
        tracker = f"{rel}/latest_checkpointed_iteration.txt"
        start = int(fake.volumes[vol].get(tracker, b"0").decode() or 0)
        total = int(p["total_steps"])
        end = total if self.steps_per_call is None else min(total, start + self.steps_per_call)
        for step in range(start + 1, end + 1):
            if step % self.save_freq and step != end:
                continue
            sub = stage_kind.merge_source(f"{rel}/global_step_{step}")  # where verl writes the model's shards
            for r in range(int(p["world_size"])):
                for kind in ("model", "optim", "extra_state"):
                    fake.write(vol, f"{sub}/{kind}_world_size_{p['world_size']}_rank_{r}.pt", b"w" * 8)
            fake.write(vol, tracker, str(step))
            # runtime.verl.save_marker's completion marker, written last like inside verl
            fake.write(vol, f"{rel}/global_step_{step}/retool_complete.json", json.dumps(
                {"step": step, "world_size": int(p["world_size"]), "restart_id": p["restart_id"]}))
        now = fake.clock()
        fake.write(vol, f"{rel}/_retool/progress.json", records.dumps(StageProgress(
            step=end, total=total, segment=p["segment"], attempt_started_at=now, updated_at=now, active_s=60.0 * end,
            metrics={"train/loss": 0.5})))
        if end < total:
            nxt = {**p, "segment": int(p["segment"]) + 1}
            next_id = fake.spawn(call.app_name, call.function, nxt)
            launch_id = (p.get("launch") or {}).get("launch_id")
            fake.write(vol, f"{rel}/_retool/run.json", records.dumps(StageRun(
                call_id=next_id, segment=nxt["segment"], app_name=call.app_name, function=call.function,
                launched_at=now, launch_id=launch_id, previous_call_id=call.call_id)))
            return StageResult(outcome="continued", step=end, segment=p["segment"], next_call_id=next_id,
                               active_s=60.0 * end).model_dump()
        result = StageResult(outcome="finished", step=end, segment=p["segment"], active_s=60.0 * end)
        fake.write(vol, f"{rel}/_retool/result.json", records.dumps(result.model_copy(update={"finished_at": now})))
        return result.model_dump()

    def evaluate(self, call: FakeCall, fake: FakeModal) -> dict[str, Any]:
        """What `python -m runtime.eval.run JOB` leaves in its run directory: the job (written
        by the launch) says how many samples per problem; rounds already complete in
        progress.json are kept and only the new ones drawn (samples appended), then
        progress.json and results.json. Each dataset has `eval_problems` problems; a sample is
        correct when (problem + sample) % 3 == 0."""
        from runtime.eval.job import EvalJob, Progress
        from runtime.eval.samples import Sample

        p = call.payload
        vol, rel = volume_path(p, p["checkpoint_dir"])
        files = fake.volumes[vol]
        job = EvalJob.model_validate_json(files[f"{rel}/job.json"])
        progress = Progress.model_validate_json(files.get(f"{rel}/progress.json", b"{}"))
        start = progress.rounds
        lines = [Sample(dataset=d, problem=i, sample=k, response="\\boxed{1}", answer="1" if (i + k) % 3 == 0 else "2",
                        ground_truth="1", correct=(i + k) % 3 == 0, score=1.0 if (i + k) % 3 == 0 else -1.0,
                        tool_calls=1, response_tokens=100).model_dump_json()
                 for k in range(start, job.samples) for d in sorted(job.datasets) for i in range(self.eval_problems)]
        old = files.get(f"{rel}/samples.jsonl", b"")
        old = old.decode() if isinstance(old, bytes) else old
        fake.write(vol, f"{rel}/samples.jsonl", old + "".join(line + "\n" for line in lines))
        self.drawn.append(len(lines))
        rounds = max(start, job.samples)
        fake.write(vol, f"{rel}/progress.json", Progress(
            problems={d: self.eval_problems for d in job.datasets}, rounds=rounds,
            drawn=rounds * self.eval_problems * len(job.datasets), target=job.samples).model_dump_json())
        fake.write(vol, f"{rel}/results.json", json.dumps(
            {"stage": job.stage, "samples": job.samples, "engine": "vllm", "generated_tokens": 100 * len(lines),
             "generation_s": 1.0, "tokens_per_s": 100.0 * len(lines), "device": "cuda"}))
        result = StageResult(outcome="finished", step=rounds, segment=p["segment"], active_s=60.0 * (rounds - start))
        fake.write(vol, f"{rel}/_retool/result.json", records.dumps(result))
        return result.model_dump()

    def finalize(self, call: FakeCall, fake: FakeModal) -> Any:
        p = call.payload
        vol = p["volume"]
        merged = p["merged_dir"]
        # merged_dir is <mount>/<stage>/<rid16>/merged: the volume path drops the mount
        rel = merged.split("/", 2)[2]
        fake.write(vol, f"{rel}/config.json", "{}")
        out: dict[str, Any] = {"model_path": merged, "final_step": p["step"], "checkpoint": p["checkpoint_path"]}
        if p.get("tool_call_check"):
            out.update({"tool_call_rate": 0.9, "tool_call_prompts": p["tool_call_check"]["prompts"]})
        return out
