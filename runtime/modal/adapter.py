"""The one thin layer between retool and the Modal SDK: the only module that imports `modal`.

`ModalAdapter` is the protocol the backend, the state store and the container worker call;
`SdkAdapter` implements it with the real client (imported lazily, inside methods, so
`retool plan` never pays for it); `tests/fakes/fake_modal.py` implements it in memory.

Rules every `SdkAdapter` call follows (docs/modal.md, "Offline behaviour"):
- no token → `TerminalError` at once, saying how to log in (the SDK would raise AuthError);
- every remote call runs under a short deadline in a daemon thread, because with a token and
  no reachable server the SDK retries for about a minute: past the deadline the call raises
  `ModalUnreachable` (a `TransientError`) and the caller decides (status says "unreachable",
  apply stops; a run is never relaunched because it could not be reached);
- SDK exceptions are translated by meaning (`translate`): unreachable (ConnectionError,
  ServiceError, InternalError, rate limits: `ModalUnreachable`, retry later, nothing
  decided), gone (a missing file or volume: FileNotFoundError / `VolumeNotFound`; a malformed
  call id: `CallNotFound`; an unknown one polls as expired, as Modal answers it), terminal (AuthError, PermissionDeniedError, VersionError:
  `TerminalError`). Polling classifies the call itself (`CallOutcome.state`).

Paths inside volumes are relative to the volume's root (`sft/abc/global_step_5/x.pt`).
"""

from __future__ import annotations

import builtins
import io
import os
import tomllib
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from reconciler.errors import RetoolError, TerminalError, TransientError
from runtime.cluster.layout import ClusterInfo
from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep
from runtime.modal.layout import WORKER_MODULE

T = TypeVar("T")

LOGIN_HINT = "run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET), then try again"
CALL_TIMEOUT_S = 20.0  # metadata calls: answer in seconds or report the server unreachable
DATA_TIMEOUT_S = 300.0  # small file transfers (records, markers); data uploads have no deadline


class ModalUnreachable(TransientError):
    """Modal did not answer in time, or the connection failed. Nothing was decided."""


class VolumeNotFound(TerminalError):
    """A write to a Modal volume that does not exist (the SDK's NotFoundError on upload)."""


class CallNotFound(TerminalError):
    """Modal knows no function call with this id (another workspace or environment, or never made)."""


class UploadProgress(BaseModel):
    """How far a data upload is: files and bytes done of the total, and the file just sent."""

    model_config = ConfigDict(frozen=True)

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    current: str = ""


UploadProgressFn = Callable[[UploadProgress], None]


def upload_plan(local: Path) -> list[tuple[str, Path]]:
    """(path relative to the upload's root, local file) for a file or a folder, in a stable order."""
    if local.is_file():
        return [(local.name, local)]
    return [(f.relative_to(local).as_posix(), f) for f in sorted(local.rglob("*")) if f.is_file()]


class FunctionStats(BaseModel):
    """`Function.get_current_stats()`: inputs waiting, and containers running, right now."""

    model_config = ConfigDict(frozen=True)

    backlog: int = 0
    runners: int = 0


class VolumeEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the volume root, no leading slash
    is_dir: bool
    size: int = 0
    mtime: float = 0.0


# expired: Modal no longer keeps the result; lost: Modal lost the input (InternalFailure: a
# preempted or failed worker after its retries) -- both are judged from what the run left
# on its volume, and relaunched from the checkpoint when it left no result.
# terminated: Modal ended the call with no result and no exception (TERMINATED: a cancel, an OOM kill)
CallState = Literal["running", "succeeded", "failed", "cancelled", "terminated", "expired", "lost"]


class CallOutcome(BaseModel):
    """What `FunctionCall.get(timeout=0)` said about a spawned call."""

    model_config = ConfigDict(frozen=True)

    state: CallState
    result: Any = None  # the function's return value (a JSON-able dict for retool's functions)
    error: str = ""


class ModalAdapter(Protocol):
    """Everything retool asks of Modal. `env` is the Modal environment (None: the profile's)."""

    # --- credentials and reachability
    def credentials_problem(self) -> str | None:
        """Why no call can be made (no token), without any network call; None when a token is set."""
        ...

    def check_connection(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """One round trip that proves the token works; raises TerminalError / ModalUnreachable."""
        ...

    # --- volumes (client side)
    def volume_exists(self, name: str, *, env: str | None = None) -> bool: ...

    def create_volume(self, name: str, *, env: str | None = None) -> bool:
        """Create if missing; True when it was created now."""
        ...

    def delete_volume(self, name: str, *, env: str | None = None) -> bool:
        """Delete if present; True when it existed."""
        ...

    def listdir(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> list[VolumeEntry]:
        """Entries under `path` (FileNotFoundError when it does not exist)."""
        ...

    def read_file(self, volume: str, path: str, *, env: str | None = None) -> bytes:
        """Whole file (FileNotFoundError when missing)."""
        ...

    def put_files(self, volume: str, files: Mapping[str, bytes | Path], *, env: str | None = None) -> None:
        """Upload (overwriting) in one batch under a deadline: small records (remote path ->
        bytes or a local file). `VolumeNotFound` when the volume does not exist (nothing is created)."""
        ...

    def upload_data(self, volume: str, remote_dir: str, local: Path, *, env: str | None = None,
                    progress: UploadProgressFn | None = None) -> None:
        """Upload a local file or folder (a `path:` model or dataset: gigabytes) under
        `remote_dir`, file by file with `progress` after each, with no deadline once the
        connection is proven (a slow upload is not an unreachable server). Consumers must treat
        `remote_dir` as incomplete until the caller records it done: a failure leaves part of it."""
        ...

    def remove(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> None:
        """Remove a file or directory; FileNotFoundError when it is not there."""
        ...

    # --- dict (locks and launch keys only: entries expire after 7 idle days)
    def dict_put(self, name: str, key: str, value: str, *, skip_if_exists: bool = False, env: str | None = None) -> bool:
        """False when `skip_if_exists` and the key exists (atomic put-if-absent)."""
        ...

    def dict_get(self, name: str, key: str, *, env: str | None = None) -> str | None: ...

    def dict_pop(self, name: str, key: str, *, env: str | None = None) -> str | None: ...

    # --- app and calls
    def deploy(self, definition: AppDefinition) -> None:
        """Build the image and deploy the app (idempotent; images are cached by recipe)."""
        ...

    def stop_app(self, app_name: str, *, env: str | None = None) -> None:
        """Stop a deployed app (its functions take no more inputs); nothing when it is not deployed."""
        ...

    def spawn(self, app_name: str, function: str, payload: dict[str, Any], *, env: str | None = None) -> str:
        """Spawn one call of a deployed function; returns the FunctionCall id."""
        ...

    def poll(self, call_id: str) -> CallOutcome:
        """`get(timeout=0)`, classified by `call_outcome` (an unknown id is `expired`, as Modal
        answers it; `CallNotFound` for an id Modal refuses as malformed), `ModalUnreachable`
        when Modal cannot be asked or answers with a conflict (the call's fate is unknown)."""
        ...

    def wait(self, call_id: str, timeout_s: float) -> CallOutcome:
        """Like poll, but waits up to `timeout_s` for a result."""
        ...

    def cancel(self, call_id: str) -> None: ...

    def function_stats(self, app_name: str, function: str, *, env: str | None = None) -> FunctionStats:
        """Inputs queued and containers running for a deployed function (a spawn whose answer
        was lost shows up here before its container starts)."""
        ...

    def secret_problem(self, name: str, keys: list[str], *, env: str | None = None) -> str | None:
        """Why the Modal secret `name` cannot provide `keys` (missing, or keys absent); None when it can."""
        ...

    def build_image_now(self, steps: list[ImageStep], *, env: str | None = None) -> str:
        """Build the image chain eagerly (no function runs) in the environment `env` (the
        spec's `modal.environment`, where apply will deploy and find it cached); returns the image id."""
        ...

    def web_url(self, app_name: str, function: str, *, env: str | None = None) -> str: ...

    def gpu_rates(self) -> dict[str, float]:
        """USD per GPU-hour by Modal GPU type, from the workspace's billing rates."""
        ...

    # --- inside a container
    def reload_volume(self, name: str) -> None: ...

    def commit_volume(self, name: str) -> None: ...

    def current_call_id(self) -> str | None: ...

    def cluster_info(self) -> ClusterInfo:
        """This container's rank, its cluster's id and every container's address, in a clustered function."""
        ...


# --------------------------------------------------------------------------- deadlines


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread; give up after `timeout_s` (the thread is abandoned,
    never joined, so a hung SDK retry loop cannot keep the process alive at exit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"modal:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ModalUnreachable(
            f"Modal did not answer within {timeout_s:g} s ({what})",
            "the server may be unreachable from here; nothing was changed by this call",
            "check the network (and MODAL_SERVER_URL if set) and try again",
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------- the real adapter


def modal_token_configured() -> bool:
    """Whether the Modal client would find a token, read the way it reads them (env vars,
    then the selected or active profile of MODAL_CONFIG_PATH / ~/.modal.toml) without
    importing `modal`."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    sections = {k: v for k, v in profiles.items() if isinstance(v, dict)}
    wanted = os.environ.get("MODAL_PROFILE")
    if wanted:
        chosen = sections.get(wanted, {})
    else:
        active = [v for v in sections.values() if v.get("active")]
        chosen = active[0] if active else (next(iter(sections.values())) if len(sections) == 1 else {})
    return bool(chosen.get("token_id") and chosen.get("token_secret"))


class SdkAdapter:
    """`ModalAdapter` over the installed `modal` client."""

    def __init__(self, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.call_timeout_s = call_timeout_s

    # ------------------------------------------------------------ plumbing

    def _modal(self) -> Any:
        """The `modal` module for calls that reach Modal, imported only once a token exists:
        without one, nothing (plan, status) should pay for or depend on importing the client."""
        problem = self.credentials_problem()
        if problem:
            raise TerminalError(problem, "", LOGIN_HINT)
        return self._import_modal()

    @staticmethod
    def _import_modal() -> Any:
        try:
            import modal
        except ImportError as exc:
            raise TerminalError(
                "The Modal client is not installed", str(exc), "install it: `pip install 'retool[modal]'`"
            ) from exc
        return modal

    def _in_container(self) -> bool:
        return bool(os.environ.get("MODAL_TASK_ID"))

    def _call(self, fn: Callable[[], T], what: str, timeout_s: float | None = None) -> T:
        """Credentials check, deadline, and exception translation around one SDK call."""
        problem = None if self._in_container() else self.credentials_problem()
        if problem:
            raise TerminalError(problem, "", LOGIN_HINT)
        modal = self._modal()
        try:
            return call_with_deadline(fn, timeout_s or self.call_timeout_s, what)
        except Exception as exc:  # noqa: BLE001 - translated by meaning, or re-raised as is
            translated = translate(modal.exception, exc, what)
            if translated is None or translated is exc:
                raise
            raise translated from exc

    def credentials_problem(self) -> str | None:
        if self._in_container():
            return None
        if modal_token_configured():
            return None
        return "No Modal credentials: no token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ~/.modal.toml"

    def check_connection(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        modal = self._modal()
        self._call(lambda: modal.Client.from_env().hello(), "connect", timeout_s)

    # ------------------------------------------------------------ volumes

    def _volume(self, name: str, env: str | None, create: bool = False) -> Any:
        return self._modal().Volume.from_name(name, environment_name=env, create_if_missing=create)

    def volume_exists(self, name: str, *, env: str | None = None) -> bool:
        not_found = self._modal().exception.NotFoundError

        def probe() -> bool:
            try:
                self._volume(name, env).hydrate()
            except not_found:
                return False
            return True

        return self._call(probe, f"volume {name}")

    def create_volume(self, name: str, *, env: str | None = None) -> bool:
        if self.volume_exists(name, env=env):
            return False
        modal = self._modal()
        self._call(
            lambda: modal.Volume.objects.create(name, allow_existing=True, environment_name=env or ""),
            f"create volume {name}",
        )
        return True

    def delete_volume(self, name: str, *, env: str | None = None) -> bool:
        if not self.volume_exists(name, env=env):
            return False
        modal = self._modal()
        self._call(
            lambda: modal.Volume.objects.delete(name, allow_missing=True, environment_name=env or ""),
            f"delete volume {name}",
        )
        return True

    def listdir(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> list[VolumeEntry]:
        modal = self._modal()
        not_found = modal.exception.NotFoundError
        dir_type = modal.volume.FileEntryType.DIRECTORY

        def run() -> list[VolumeEntry]:
            try:
                entries = self._volume(volume, env).listdir("/" + path.strip("/"), recursive=recursive)
            except not_found as exc:
                raise FileNotFoundError(f"{volume}:{path}") from exc
            return [
                VolumeEntry(path=e.path.lstrip("/"), is_dir=e.type == dir_type, size=int(e.size), mtime=float(e.mtime))
                for e in entries
            ]

        return self._call(run, f"listdir {volume}:{path}")

    def read_file(self, volume: str, path: str, *, env: str | None = None) -> bytes:
        not_found = self._modal().exception.NotFoundError

        def run() -> bytes:
            buf = io.BytesIO()
            try:
                for chunk in self._volume(volume, env).read_file("/" + path.strip("/")):
                    buf.write(chunk)
            except not_found as exc:
                raise FileNotFoundError(f"{volume}:{path}") from exc
            return buf.getvalue()

        return self._call(run, f"read {volume}:{path}", DATA_TIMEOUT_S)

    def put_files(self, volume: str, files: Mapping[str, bytes | Path], *, env: str | None = None) -> None:
        not_found = self._modal().exception.NotFoundError

        def run() -> None:
            try:
                upload(self._volume(volume, env))
            except not_found as exc:
                raise VolumeNotFound(f"Modal volume {volume} does not exist", str(exc),
                                     "`retool apply` creates the spec's volumes; check modal.environment") from exc

        def upload(vol: Any) -> None:
            with vol.batch_upload(force=True) as batch:
                for remote, data in files.items():
                    target = "/" + remote.strip("/")
                    if isinstance(data, Path):
                        if data.is_dir():
                            batch.put_directory(str(data), target)
                        else:
                            batch.put_file(str(data), target)
                    else:
                        batch.put_file(io.BytesIO(data), target)

        self._call(run, f"upload to {volume}", DATA_TIMEOUT_S)

    def upload_data(self, volume: str, remote_dir: str, local: Path, *, env: str | None = None,
                    progress: UploadProgressFn | None = None) -> None:
        modal = self._modal()
        self.check_connection()  # fail fast when Modal cannot be reached; the transfer has no deadline
        plan = upload_plan(local)
        total = sum(f.stat().st_size for _, f in plan)
        done = 0
        vol = self._volume(volume, env)
        for i, (rel, path) in enumerate(plan, start=1):
            target = "/" + f"{remote_dir.strip('/')}/{rel}"
            try:
                with vol.batch_upload(force=True) as batch:
                    batch.put_file(str(path), target)
            except modal.exception.NotFoundError as exc:
                raise VolumeNotFound(f"Modal volume {volume} does not exist", str(exc),
                                     "`retool apply` creates the spec's volumes; check modal.environment") from exc
            except Exception as exc:  # noqa: BLE001 - translated by meaning, or re-raised as is
                translated = translate(modal.exception, exc, f"upload {path} to {volume}")
                if translated is None or translated is exc:
                    raise
                raise translated from exc
            done += path.stat().st_size
            if progress is not None:
                progress(UploadProgress(files_done=i, files_total=len(plan), bytes_done=done, bytes_total=total,
                                        current=rel))

    def remove(self, volume: str, path: str, *, recursive: bool = False, env: str | None = None) -> None:
        not_found = self._modal().exception.NotFoundError

        def run() -> None:
            # modal 1.6.4's remove_file turns the server's NotFoundError into the built-in
            # FileNotFoundError; a missing volume raises NotFoundError when it hydrates.
            try:
                self._volume(volume, env).remove_file("/" + path.strip("/"), recursive=recursive)
            except not_found as exc:
                raise FileNotFoundError(f"{volume}:{path}") from exc

        self._call(run, f"remove {volume}:{path}")

    # ------------------------------------------------------------ dict

    def _dict(self, name: str, env: str | None) -> Any:
        return self._modal().Dict.from_name(name, environment_name=env, create_if_missing=True)

    def dict_put(self, name: str, key: str, value: str, *, skip_if_exists: bool = False, env: str | None = None) -> bool:
        return bool(self._call(lambda: self._dict(name, env).put(key, value, skip_if_exists=skip_if_exists), f"dict {name}"))

    def dict_get(self, name: str, key: str, *, env: str | None = None) -> str | None:
        value = self._call(lambda: self._dict(name, env).get(key, None), f"dict {name}")
        return None if value is None else str(value)

    def dict_pop(self, name: str, key: str, *, env: str | None = None) -> str | None:
        value = self._call(lambda: self._dict(name, env).pop(key, None), f"dict {name}")
        return None if value is None else str(value)

    # ------------------------------------------------------------ app

    def build_image(self, steps: list[ImageStep]) -> Any:
        """The `modal.Image` for a chain of steps (no network call)."""
        modal = self._import_modal()  # building objects is offline: no token needed
        first, rest = steps[0], steps[1:]
        if first.op != "from_registry":
            raise ValueError("an image chain starts with from_registry")
        image = modal.Image.from_registry(first.args[0], **first.options)
        for step in rest:
            if step.op == "env":
                image = image.env(dict(step.env))
            else:
                image = getattr(image, step.op)(*step.args, **step.options)
        return image

    def build_app(self, definition: AppDefinition) -> Any:
        """The `modal.App` for a definition (no network call): every function is a plain
        global of `runtime.modal.worker`, registered under its own name; the container
        imports that module and finds the function by its implementation name."""
        import importlib

        modal = self._import_modal()  # building objects is offline: no token needed
        worker = importlib.import_module(WORKER_MODULE)
        app = modal.App(definition.app_name)
        image = self.build_image(definition.image)
        # Volumes are created by ensure_volume, never here: a deleted protected volume must
        # not come back empty behind the user's back (deploy then fails with NotFoundError).
        volumes = {
            name: modal.Volume.from_name(name, environment_name=definition.environment)
            for fn in definition.functions for name in fn.volumes.values()
        }
        for fn in definition.functions:
            self._register(app, modal, image, volumes, fn, getattr(worker, fn.entry))
        return app

    @staticmethod
    def _register(app: Any, modal: Any, image: Any, volumes: dict[str, Any], fn: FunctionSpec, raw: Any) -> None:
        target: Any = raw
        if fn.web:
            target = modal.asgi_app(label=None)(target)
        if fn.concurrent_inputs:
            target = modal.concurrent(max_inputs=fn.concurrent_inputs)(target)
        if fn.cluster_size:
            target = modal.clustered(size=fn.cluster_size, rdma=True)(target)
        kwargs: dict[str, Any] = {
            "image": image,
            "name": fn.name,
            "timeout": fn.timeout_s,
            "volumes": {path: volumes[name] for path, name in fn.volumes.items()},
            "secrets": [modal.Secret.from_name(s) for s in fn.secrets],
            # retool's packages come from the image's add_local_python_source step, nothing else
            "include_source": False,
        }
        if fn.efa:  # Modal's multi-node guide: EFA unlocks extra capacity of H100 clusters
            kwargs["experimental_options"] = {"efa_enabled": True}
        if fn.env:
            kwargs["env"] = dict(fn.env)  # non-secret settings only (the SDK ships them as a dict secret)
        if fn.gpu is not None:
            kwargs["gpu"] = fn.gpu
        if fn.cpu is not None:
            kwargs["cpu"] = fn.cpu
        if fn.memory_mb is not None:
            kwargs["memory"] = fn.memory_mb
        if fn.retries:
            kwargs["retries"] = modal.Retries(max_retries=fn.retries, initial_delay=10.0, backoff_coefficient=2.0)
        if fn.min_containers is not None:
            kwargs["min_containers"] = fn.min_containers
        if fn.max_containers is not None:
            kwargs["max_containers"] = fn.max_containers
        app.function(**kwargs)(target)

    def deploy(self, definition: AppDefinition) -> None:
        modal = self._modal()
        self.check_connection()
        app = self.build_app(definition)
        # Image builds can take many minutes; the connection was just proven, so no deadline here.
        with modal.enable_output():
            app.deploy(name=definition.app_name, environment_name=definition.environment)

    def stop_app(self, app_name: str, *, env: str | None = None) -> None:
        modal = self._modal()

        def run() -> None:
            try:
                app = modal.App.lookup(app_name, environment_name=env)
            except modal.exception.NotFoundError:
                return
            app.stop()

        self._call(run, f"stop app {app_name}")

    def _function(self, app_name: str, function: str, env: str | None) -> Any:
        return self._modal().Function.from_name(app_name, function, environment_name=env)

    def spawn(self, app_name: str, function: str, payload: dict[str, Any], *, env: str | None = None) -> str:
        def run() -> str:
            return str(self._function(app_name, function, env).spawn(payload).object_id)

        return self._call(run, f"spawn {app_name}.{function}", 60.0)

    def _outcome(self, call_id: str, timeout: float) -> CallOutcome:
        modal = self._modal()
        exc_mod = modal.exception

        def run() -> CallOutcome:
            try:
                value = modal.FunctionCall.from_id(call_id).get(timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - InputCancellation is a BaseException
                return call_outcome(exc_mod, exc, call_id)
            return CallOutcome(state="succeeded", result=value)

        return self._call(run, f"poll {call_id}", self.call_timeout_s + timeout)

    def poll(self, call_id: str) -> CallOutcome:
        return self._outcome(call_id, 0)

    def wait(self, call_id: str, timeout_s: float) -> CallOutcome:
        return self._outcome(call_id, timeout_s)

    def cancel(self, call_id: str) -> None:
        modal = self._modal()
        self._call(lambda: modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True), f"cancel {call_id}")

    def function_stats(self, app_name: str, function: str, *, env: str | None = None) -> FunctionStats:
        not_found = self._modal().exception.NotFoundError

        def run() -> FunctionStats:
            try:
                stats = self._function(app_name, function, env).get_current_stats()
            except not_found:  # no such function deployed: nothing can be queued for it
                return FunctionStats()
            return FunctionStats(backlog=int(stats.backlog), runners=int(stats.num_total_runners))

        return self._call(run, f"stats of {app_name}.{function}")

    def secret_problem(self, name: str, keys: list[str], *, env: str | None = None) -> str | None:
        modal = self._modal()
        exc_mod = modal.exception

        def run() -> str | None:
            try:  # the server checks `required_keys` when the reference hydrates
                modal.Secret.from_name(name, environment_name=env, required_keys=list(keys)).hydrate()
            except (exc_mod.NotFoundError, exc_mod.InvalidError) as exc:
                return str(exc) or f"secret {name} not found"
            return None

        return self._call(run, f"secret {name}")

    def build_image_now(self, steps: list[ImageStep], *, env: str | None = None) -> str:
        modal = self._modal()
        self.check_connection()
        # retool's own sources (add_local_python_source, not copied) are mounted when a
        # function starts, not built: the layers before them are what can fail to build.
        image = self.build_image([s for s in steps if s.op != "add_local_python_source"])
        # A first build pulls the base image and installs packages: minutes, so no deadline
        # (the connection was just proven); later builds are cached by recipe.
        # `Image.build()` alone runs in an ephemeral app of Modal's default environment; the
        # spec's environment is where apply deploys, so build there.
        with modal.enable_output(), modal.App("retool-image-build").run(environment_name=env) as app:
            image.build(app)
        return str(image.object_id)

    def web_url(self, app_name: str, function: str, *, env: str | None = None) -> str:
        url = self._call(lambda: self._function(app_name, function, env).get_web_url(), f"url of {function}")
        return require_web_url(url, app_name, function)

    def gpu_rates(self) -> dict[str, float]:
        modal = self._modal()
        rates = self._call(lambda: dict(modal.Workspace.from_context().billing.rates()), "billing rates")
        return parse_gpu_rates({k: float(v) for k, v in rates.items()})

    # ------------------------------------------------------------ container side

    def reload_volume(self, name: str) -> None:
        self._modal().Volume.from_name(name).reload()

    def commit_volume(self, name: str) -> None:
        self._modal().Volume.from_name(name).commit()

    def current_call_id(self) -> str | None:
        return self._modal().current_function_call_id()

    def cluster_info(self) -> ClusterInfo:
        # modal 1.6.4: the container's cluster context, set at start-up without an RPC
        # (rank, cluster_id, container_ips (IPv6), container_ipv4_ips); `modal.Cluster.from_context()`
        # reads the same context
        import modal.experimental

        info = modal.experimental.get_cluster_info()
        return ClusterInfo(rank=int(info.rank), cluster_id=str(info.cluster_id), ips=list(info.container_ips),
                           ipv4_ips=list(info.container_ipv4_ips))


def require_web_url(url: str | None, app_name: str, function: str) -> str:
    """modal 1.6.4's `get_web_url()` answers None for a function that is not (yet) a web endpoint."""
    if not url:
        raise TerminalError(
            f"Modal has no web URL for {app_name}.{function}",
            "the deployed function is not a web endpoint (yet): an older deploy of the app, or its deploy did not finish",
            "run `retool apply` again to redeploy the app; `modal app list` shows what is deployed",
        )
    return url


def translate(exc_mod: Any, exc: BaseException, what: str) -> RetoolError | None:
    """An SDK exception by what it means for the caller; None: not the SDK's (re-raise it)."""
    if isinstance(exc, RetoolError):
        return exc
    if isinstance(exc, exc_mod.AuthError):
        return TerminalError("Modal rejected the credentials", str(exc), LOGIN_HINT)
    if isinstance(exc, (exc_mod.PermissionDeniedError, exc_mod.VersionError)):
        return TerminalError(f"Modal refused {what}: {type(exc).__name__}", str(exc))
    unreachable = (exc_mod.ConnectionError, exc_mod.ServiceError, exc_mod.InternalError, exc_mod.ResourceExhaustedError,
                   builtins.ConnectionError)
    if isinstance(exc, unreachable):
        return ModalUnreachable(f"Cannot reach Modal ({what}): {type(exc).__name__}", str(exc),
                                "nothing was decided; try again when Modal answers")
    return None


def call_outcome(exc_mod: Any, exc: BaseException, call_id: str) -> CallOutcome:
    """What `FunctionCall.get(timeout=...)` raising `exc` says about the call, by exception type
    exactly as modal 1.6.4 raises them (`_Invocation.poll_function`, `_process_result`):

    - the built-in TimeoutError: outputs empty, inputs unfinished → running;
    - OutputExpiredError: no outputs and no unfinished inputs → expired (an unknown or
      long-finished call id answers the same way);
    - InternalFailure (GENERIC_STATUS_INTERNAL_FAILURE: Modal lost the input) → lost;
    - FunctionTimeoutError (GENERIC_STATUS_TIMEOUT) → failed, timed out;
    - RemoteError itself (any other non-success status with no exception data: TERMINATED
      when the call was cancelled, or Modal ended the container: OOM kill, eviction) →
      terminated; ImageBuildError and other RemoteError subclasses are failures;
    - InputCancellation → cancelled; the function's own exception, re-raised → failed;
    - ConflictError (a subclass of InvalidError: gRPC ABORTED/FAILED_PRECONDITION) says
      nothing about the call → `ModalUnreachable`, ask again; NotFoundError or another
      InvalidError (a malformed id) → `CallNotFound`.
    Errors that say nothing about the call (the connection, the credentials) are raised."""
    if isinstance(exc, builtins.TimeoutError) and not isinstance(exc, exc_mod.Error):
        return CallOutcome(state="running")
    if isinstance(exc, exc_mod.OutputExpiredError):
        return CallOutcome(state="expired", error="Modal has no output and no unfinished input for the call")
    if isinstance(exc, exc_mod.InternalFailure):
        return CallOutcome(state="lost", error=f"Modal lost the call's input: {exc}"[-4000:])
    if isinstance(exc, exc_mod.FunctionTimeoutError):
        return CallOutcome(state="failed", error=f"timed out: {exc}")
    if isinstance(exc, exc_mod.ConflictError):
        raise ModalUnreachable(f"Modal answered poll {call_id} with a conflict; nothing was decided", str(exc),
                               "try again in a moment") from exc
    if isinstance(exc, (exc_mod.NotFoundError, exc_mod.InvalidError)):
        raise CallNotFound(f"Modal knows no function call {call_id}", str(exc),
                           "was it started in another workspace or environment (modal.environment)?") from exc
    if type(exc) is exc_mod.RemoteError:
        return CallOutcome(state="terminated", error=f"Modal ended the call without a result: {exc}"[-4000:])
    if isinstance(exc, exc_mod.InputCancellation):
        return CallOutcome(state="cancelled", error="cancelled")
    translated = translate(exc_mod, exc, f"poll {call_id}")
    if translated is not None:
        raise translated from exc
    if not isinstance(exc, Exception):
        raise exc  # KeyboardInterrupt, SystemExit
    return CallOutcome(state="failed", error=f"{type(exc).__name__}: {exc}"[-4000:])


def parse_gpu_rates(rates: dict[str, float]) -> dict[str, float]:
    """Billing-rate keys name a resource (`gpu.h100`, `H100`...) with a per-second price;
    map them to USD per GPU-hour by Modal GPU type. Keys that name no GPU are ignored."""
    from reconciler.spec import GPU_TYPES

    out: dict[str, float] = {}
    by_norm = {t.lower(): t for t in GPU_TYPES if not t.endswith("!")}
    for key, value in rates.items():
        norm = key.lower().replace("gpu.", "").replace("gpu_", "").replace("_", "-").replace("!", "")
        gpu = by_norm.get(norm)
        if gpu is None or value <= 0:
            continue
        per_hour = value * 3600 if value < 0.1 else value  # per-second prices are tiny numbers
        out[gpu] = per_hour
        if gpu == "H100":
            out.setdefault("H100!", per_hour)
    return out
