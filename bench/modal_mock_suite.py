"""Drive retool's Modal layer through the real `modal` client against Modal's own mock server.

    python bench/modal_mock_suite.py /path/to/modal-client        # a checkout, or a bare git dir
    python bench/modal_mock_suite.py REPO --only volume --only store

modal-labs/modal-client tests its client against `MockClientServicer`, an in-process gRPC
server in its `py/test/conftest.py`. This script loads that file at run time from the checkout
given (nothing of modal-client is copied into this repository), starts the server on
loopback, points the installed `modal` client at it (MODAL_SERVER_URL and a token it
accepts) and runs retool's `SdkAdapter` and `ModalStore` against it, one named case at a
time. It prints a table of PASS/FAIL with why, the adaptations it had to make, and what the
mock does differently from Modal's servers; the exit status is 1 when any case fails.

The checkout's conftest is written for the client of its own commit; what the installed
client (the one retool pins) changed is adapted here, at run time, on the loaded module and
its servicer class (`adapt`): each adaptation is listed in the output.
Needs the `modal-mock` extra (`pip install -e '.[modal,modal-mock]'`: PyJWT and
pytest-asyncio, which that conftest imports). See docs/modal.md, "Checked against Modal's
mock server".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFTEST = "py/test/conftest.py"
TOKEN = ("ak-retool-mock", "as-retool-mock")  # the servicer accepts exactly the credentials it is given
CALL_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- loading the mock


@dataclass
class Source:
    conftest: Path
    commit: str  # the modal-client commit, or "unknown" for a plain directory without git
    sha256: str  # of the conftest.py that ran
    client_version: str  # modal-client's own version at that commit (py/modal_version)


def locate(checkout: Path, workdir: Path) -> Source:
    """The conftest of a checkout (a work tree, or a bare git dir: its HEAD is extracted)."""
    direct = checkout / CONFTEST
    if direct.is_file():
        conftest, root = direct, checkout
    else:
        out = subprocess.run(["git", "-C", str(checkout), "archive", "HEAD", CONFTEST, "py/modal_version"],
                             capture_output=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{checkout}: no {CONFTEST} and not a git repository of modal-client "
                             f"({out.stderr.decode(errors='replace').strip()})")
        subprocess.run(["tar", "-x", "-C", str(workdir)], input=out.stdout, check=True)
        conftest, root = workdir / CONFTEST, workdir
    rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    commit = rev.stdout.strip() if rev.returncode == 0 else "unknown"
    version = "unknown"
    version_file = root / "py/modal_version/__init__.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    return Source(conftest, commit, hashlib.sha256(conftest.read_bytes()).hexdigest(), version)


def load_conftest(path: Path) -> ModuleType:
    """Import the checkout's conftest.py as a module, against the INSTALLED modal (the
    checkout's own `modal` package is never put on sys.path)."""
    spec = importlib.util.spec_from_file_location("modal_client_mock_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SystemExit(f"cannot import {path}: {exc}\ninstall the extra: pip install -e '.[modal,modal-mock]'") from exc
    return module


# --------------------------------------------------------------------------- adapting it to the installed client


class _Stream:
    """A gRPC stream whose request and response messages pass through transforms."""

    def __init__(self, stream: Any, on_request: Callable[[Any], Any] | None, on_response: Callable[[Any], Any] | None):
        self._stream, self._on_request, self._on_response = stream, on_request, on_response

    async def recv_message(self) -> Any:
        message = await self._stream.recv_message()
        return self._on_request(message) if self._on_request and message is not None else message

    async def send_message(self, message: Any, **kwargs: Any) -> Any:
        if self._on_response is not None:
            message = self._on_response(message)
        return await self._stream.send_message(message, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def wrap_handler(cls: type, name: str, *, on_request: Callable[[Any, Any], Any] | None = None,
                 on_response: Callable[[Any, Any], Any] | None = None) -> None:
    """Rewrite what one servicer method receives or sends (`hook(servicer, message)`); its own
    logic runs unchanged."""
    original = getattr(cls, name)

    async def handler(self: Any, stream: Any) -> None:
        receive = (lambda message: on_request(self, message)) if on_request else None
        respond = (lambda message: on_response(self, message)) if on_response else None
        await original(self, _Stream(stream, receive, respond))

    setattr(cls, name, handler)


class _RemovedFieldsRead:
    """A proto message whose fields removed since the checkout's protocol read as their default."""

    def __init__(self, message: Any, removed: dict[str, Any]):
        self._message, self._removed = message, removed

    def __getattr__(self, name: str) -> Any:
        if name in self._removed and name not in self._message.DESCRIPTOR.fields_by_name:
            return self._removed[name]
        return getattr(self._message, name)


class _LenientMessageType(type):
    """Stands in for one generated message class: construction drops keyword arguments that
    name removed fields; isinstance and class attributes are the real class's."""

    _real: Any
    _removed: dict[str, Any]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real(*args, **{k: v for k, v in kwargs.items() if k not in cls._removed
                                   or k in cls._real.DESCRIPTOR.fields_by_name})

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._real)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._real, name)


class _LenientProtos(ModuleType):
    """`api_pb2` as the mock sees it: the installed client's messages, lenient about removed fields."""

    def __init__(self, real: ModuleType, removed: dict[str, Any]):
        super().__init__(real.__name__)
        self._real, self._removed = real, removed
        self._types: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        if isinstance(value, type) and hasattr(value, "DESCRIPTOR") and hasattr(value.DESCRIPTOR, "fields_by_name"):
            if name not in self._types:
                self._types[name] = _LenientMessageType(name, (), {"_real": value, "_removed": self._removed})
            return self._types[name]
        return value


def _type_name(fd: Any) -> str:
    """A message field's type; for a map, its value's (each message has its own entry type)."""
    if fd.message_type.GetOptions().map_entry:
        value = fd.message_type.fields_by_name["value"]
        return f"map<{value.message_type.full_name if value.message_type else value.type}>"
    return str(fd.message_type.full_name)


def function_data_of(api_pb2: Any, definition: Any) -> Any:
    """A stored definition as the `FunctionData` modal 1.6.4 expects back: a `Function` (one
    GPU type) becomes its only ranked function, with the fields both messages share."""
    if isinstance(definition, api_pb2.FunctionData):
        return definition
    data = api_pb2.FunctionData()
    function_fields = definition.DESCRIPTOR.fields_by_name
    for fd in data.DESCRIPTOR.fields:
        same = function_fields.get(fd.name)
        if same is None or same.type != fd.type or same.is_repeated != fd.is_repeated or fd.name == "ranked_functions":
            continue
        if fd.message_type is not None and (same.message_type is None or _type_name(same) != _type_name(fd)):
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target, values_are_messages = getattr(data, fd.name), fd.message_type.fields_by_name["value"].message_type
            for key, value in getattr(definition, fd.name).items():
                if values_are_messages is not None:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif fd.is_repeated:
            getattr(data, fd.name).extend(getattr(definition, fd.name))
        elif fd.message_type is not None:
            if definition.HasField(fd.name):
                getattr(data, fd.name).CopyFrom(getattr(definition, fd.name))
        else:
            setattr(data, fd.name, getattr(definition, fd.name))
    data.ranked_functions.add(rank=0).function.CopyFrom(definition)
    return data


def adapt(mock: ModuleType) -> list[str]:
    """Make the checkout's servicer speak the installed client's protocol; returns what was changed."""
    import modal
    import modal.mount
    from modal_proto import api_pb2

    done: list[str] = []
    servicer = mock.MockClientServicer

    # 1. `python_standalone_mount_name(version)` became (version, builder_version), and
    #    PYTHON_STANDALONE_VERSIONS is keyed by image builder version first.
    if isinstance(next(iter(modal.mount.PYTHON_STANDALONE_VERSIONS.values())), dict):
        class _Versioned(str):
            builder = ""

        pairs = []
        for builder, versions in modal.mount.PYTHON_STANDALONE_VERSIONS.items():
            for version in versions:
                item = _Versioned(version)
                item.builder = builder
                pairs.append(item)
        real_name = modal.mount.python_standalone_mount_name
        setattr(mock, "PYTHON_STANDALONE_VERSIONS", pairs)
        setattr(mock, "python_standalone_mount_name", lambda version, builder=None: real_name(
            str(version), builder or getattr(version, "builder", "")))
        done.append("python_standalone_mount_name(version) -> (version, builder_version): the mock registers "
                    "the standalone mounts of every builder version")

    # 2. `Client.set_env_client` is `_set_env_client` in 1.6.4 (the conftest's fixtures call the old name).
    if not hasattr(modal.Client, "set_env_client") and hasattr(modal.Client, "_set_env_client"):
        modal.Client.set_env_client = modal.Client._set_env_client  # type: ignore[attr-defined]
        done.append("Client.set_env_client -> Client._set_env_client (aliased)")

    # 3. Fields the mock writes or reads that 1.6.4's protos removed (`use_function_id`).
    removed = {name: "" for name in ("use_function_id", "use_method_name")
               if name not in api_pb2.FunctionPrecreateRequest.DESCRIPTOR.fields_by_name}
    if removed:
        setattr(mock, "api_pb2", _LenientProtos(api_pb2, removed))
        original_metadata = servicer.get_function_metadata

        def get_function_metadata(self: Any, function_id: str) -> Any:
            registry = self.app_functions
            self.app_functions = {function_id: _RemovedFieldsRead(registry[function_id], removed)}
            try:
                return original_metadata(self, function_id)
            finally:
                self.app_functions = registry

        servicer.get_function_metadata = get_function_metadata
        wrap_handler(servicer, "FunctionPrecreate", on_request=lambda _, req: _RemovedFieldsRead(req, removed))
        done.append(f"removed proto fields {sorted(removed)}: dropped where the mock writes them, "
                    "read as empty where it reads them")

    # 4. 1.6.4 reads the created function back from `FunctionCreateResponse.function_data` and a
    #    looked-up one from `FunctionGetResponse.function` (a FunctionData); the mock sends neither.
    def with_function_data(self: Any, resp: Any) -> Any:
        if not resp.HasField("function_data"):
            resp.function_data.CopyFrom(function_data_of(api_pb2, self.app_functions[resp.function_id]))
        return resp

    def with_function(self: Any, resp: Any) -> Any:
        if not resp.HasField("function"):
            resp.function.CopyFrom(function_data_of(api_pb2, self.app_functions[resp.function_id]))
        return resp

    if "function_data" in api_pb2.FunctionCreateResponse.DESCRIPTOR.fields_by_name:
        wrap_handler(servicer, "FunctionCreate", on_response=with_function_data)
        done.append("FunctionCreateResponse.function_data filled from the stored definition")
    if api_pb2.FunctionGetResponse.DESCRIPTOR.fields_by_name["function"].message_type.name == "FunctionData":
        wrap_handler(servicer, "FunctionGet", on_response=with_function)
        done.append("FunctionGetResponse.function (a FunctionData in 1.6.4) filled from the stored definition")

    # 5. SecretGetOrCreate with CREATE_IF_MISSING leaves its id unbound for a missing secret
    #    (UnboundLocalError, so `Secret.objects.create(..., allow_existing=True)` fails): a
    #    missing secret is asked as CREATE_FAIL_IF_EXISTS, which creates it.
    def create_missing(self: Any, req: Any) -> Any:
        key = (req.deployment_name, self.get_environment(req.environment_name))
        if req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING and key not in self.deployed_secrets:
            fixed = api_pb2.SecretGetOrCreateRequest()
            fixed.CopyFrom(req)
            fixed.object_creation_type = api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS
            return fixed
        return req

    wrap_handler(servicer, "SecretGetOrCreate", on_request=create_missing)
    done.append("SecretGetOrCreate(CREATE_IF_MISSING) of a missing secret: created (the mock's own "
                "branch leaves the id unbound)")

    # 6. The mock keys a volume's files by the path string as sent ("/a" and "a" are two files,
    #    and its listing strips the leading "/" of the path asked): Modal's volume paths are
    #    relative to the volume's root, so paths are made relative before the mock sees them.
    def relative(message: Any, name: str) -> None:
        if name in message.DESCRIPTOR.fields_by_name and getattr(message, name).startswith("/"):
            setattr(message, name, getattr(message, name).lstrip("/"))

    def relative_path(_: Any, req: Any) -> Any:
        for f in getattr(req, "files", ()):
            relative(f, "path")
            relative(f, "filename")
        relative(req, "path")
        return req

    for method in ("VolumePutFiles", "VolumePutFiles2", "VolumeGetFile", "VolumeGetFile2", "VolumeRemoveFile",
                   "VolumeRemoveFile2"):
        wrap_handler(servicer, method, on_request=relative_path)
    done.append("volume paths made relative to the volume's root before the mock sees them "
                "(put, get and remove)")

    # 7. A cancelled call: the mock only records FunctionCallCancel. Modal's server ends the
    #    call's input with GENERIC_STATUS_TERMINATED (what 1.6.4's `_process_result` turns into
    #    RemoteError); outputs of a cancelled call are answered that way here.
    original_outputs = servicer.FunctionGetOutputs

    async def function_get_outputs(self: Any, stream: Any) -> None:
        request = await stream.recv_message()
        if request.function_call_id in self.cancelled_calls:
            item = api_pb2.FunctionGetOutputsItem(
                input_id="in-cancelled", idx=0, data_format=api_pb2.DATA_FORMAT_PICKLE,
                result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_TERMINATED,
                                             exception="Function call was cancelled"))
            await stream.send_message(api_pb2.FunctionGetOutputsResponse(outputs=[item]))
            return
        replay = _Stream(stream, None, None)

        async def recv_again() -> Any:
            return request

        replay.recv_message = recv_again  # type: ignore[method-assign]
        await original_outputs(self, replay)

    servicer.FunctionGetOutputs = function_get_outputs
    done.append("FunctionGetOutputs of a cancelled call answers GENERIC_STATUS_TERMINATED (the mock's "
                "FunctionCallCancel only records the cancel)")
    return done


# --------------------------------------------------------------------------- running it


class MockServer:
    """The blob server and the servicer on loopback, in a thread with its own event loop."""

    def __init__(self, mock: ModuleType):
        self.mock = mock
        self.servicer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> MockServer:
        ready = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            with self.mock.blob_server_factory() as blob_server:
                async with self.mock.servicer_factory(blob_server, TOKEN) as servicer:
                    self.servicer = servicer
                    ready.set()
                    await self._stop.wait()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # noqa: BLE001 - reported by __enter__
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=run, name="modal-mock-server", daemon=True)
        self._thread.start()
        ready.wait(60)
        if self.servicer is None:
            raise RuntimeError(f"the mock server did not start: {self._error!r}") from self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables, and start from a fresh Modal client."""
    import modal

    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    modal.Client._set_env_client(None)
    try:
        yield
    finally:
        modal.Client._set_env_client(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client_env(servicer: Any) -> dict[str, str | None]:
    """A laptop or CI runner with a token, talking to the mock as its Modal server."""
    return {"MODAL_SERVER_URL": servicer.client_addr, "MODAL_TOKEN_ID": TOKEN[0], "MODAL_TOKEN_SECRET": TOKEN[1],
            "MODAL_TASK_ID": None, "MODAL_IS_REMOTE": None, "MODAL_ENVIRONMENT": None}


def container_env(servicer: Any) -> dict[str, str | None]:
    """Inside a Modal container: the container client (no token; the task id identifies it)."""
    return {"MODAL_SERVER_URL": servicer.container_addr, "MODAL_TASK_ID": "ta-retool-mock", "MODAL_IS_REMOTE": "1",
            "MODAL_TOKEN_ID": None, "MODAL_TOKEN_SECRET": None, "MODAL_ENVIRONMENT": None}


# --------------------------------------------------------------------------- cases


@dataclass
class Outcome:
    name: str
    status: str  # PASS or FAIL
    why: str


@dataclass
class Suite:
    server: MockServer
    adapter: Any
    notes: list[str] = field(default_factory=list)  # where the mock is not Modal (not retool's fault)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def servicer(self) -> Any:
        return self.server.servicer


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def raises(fn: Callable[[], Any], kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException:
    try:
        fn()
    except kind as exc:
        return exc
    except BaseException as exc:  # noqa: BLE001 - reported as the wrong exception
        raise AssertionError(f"raised {type(exc).__name__}: {exc}, expected {_names(kind)}") from exc
    raise AssertionError(f"raised nothing, expected {_names(kind)}")


def _names(kind: type[BaseException] | tuple[type[BaseException], ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def case_connection(s: Suite) -> str:
    from reconciler.errors import TerminalError

    from runtime.modal.adapter import SdkAdapter

    s.adapter.check_connection()
    with environment({**client_env(s.servicer), "MODAL_TOKEN_SECRET": "as-wrong"}):
        err = raises(SdkAdapter(call_timeout_s=CALL_TIMEOUT_S).check_connection, TerminalError)
    expect("credentials" in str(err), f"a rejected token reads {err}")
    with environment({**client_env(s.servicer), "MODAL_TOKEN_ID": None, "MODAL_TOKEN_SECRET": None}):
        err = raises(SdkAdapter(call_timeout_s=CALL_TIMEOUT_S).check_connection, TerminalError)
    return "ClientHello answered; a rejected token → TerminalError (credentials); no token → TerminalError at once"


VOLUME = "retool-mock-data"


def case_volume_create(s: Suite) -> str:
    a = s.adapter
    expect(a.volume_exists(VOLUME) is False, "a volume that was never created exists")
    expect(a.create_volume(VOLUME) is True, "create_volume did not report a creation")
    expect(a.volume_exists(VOLUME) is True, "the created volume does not exist")
    expect(a.create_volume(VOLUME) is False, "a second create_volume reported a creation")
    expect(a.create_volume("retool-mock-scratch") is True, "a second volume was not created")
    expect(a.delete_volume("retool-mock-scratch") is True, "delete_volume did not report a deletion")
    expect(a.volume_exists("retool-mock-scratch") is False, "a deleted volume exists")
    expect(a.delete_volume("retool-mock-scratch") is False, "deleting a missing volume reported a deletion")
    return "absent → created → exists; a second create is a no-op; delete, and delete again is a no-op"


def case_volume_put_files(s: Suite) -> str:
    a = s.adapter
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "record.json"
        local.write_text('{"from": "path"}')
        folder = Path(tmp) / "folder"
        (folder / "sub").mkdir(parents=True)
        (folder / "a.txt").write_text("A")
        (folder / "sub" / "b.txt").write_text("B")
        a.put_files(VOLUME, {"run/one.json": b'{"n": 1}', "run/two.json": local, "tree": folder})
    expect(a.read_file(VOLUME, "run/one.json") == b'{"n": 1}', "bytes did not round-trip")
    expect(a.read_file(VOLUME, "/run/two.json") == b'{"from": "path"}', "a local file did not round-trip")
    expect(a.read_file(VOLUME, "tree/sub/b.txt") == b"B", "a folder did not upload recursively")
    a.put_files(VOLUME, {"run/one.json": b'{"n": 2}'})
    expect(a.read_file(VOLUME, "run/one.json") == b'{"n": 2}', "put_files did not overwrite")
    exc = raises(lambda: a.put_files("retool-mock-never-created", {"x": b"1"}), Exception)
    from runtime.modal.adapter import VolumeNotFound
    expect(isinstance(exc, VolumeNotFound), f"an upload to a missing volume raised {type(exc).__name__}: {exc}")
    expect(not a.volume_exists("retool-mock-never-created"), "an upload created the missing volume")
    return "bytes, a file and a folder; overwrite; a missing volume → VolumeNotFound and nothing created"


def case_volume_upload_data(s: Suite) -> str:
    a = s.adapter
    seen: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        (model / "tokenizer").mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model / "weights.bin").write_bytes(os.urandom(300_000))
        (model / "tokenizer" / "vocab.txt").write_text("a\nb\n")
        weights = (model / "weights.bin").read_bytes()
        a.upload_data(VOLUME, "models/m1", model, progress=seen.append)
    expect(a.read_file(VOLUME, "models/m1/weights.bin") == weights, "300 kB of weights did not round-trip")
    expect(a.read_file(VOLUME, "models/m1/tokenizer/vocab.txt") == b"a\nb\n", "a nested file did not round-trip")
    expect([p.files_done for p in seen] == [1, 2, 3], f"progress reports {[p.files_done for p in seen]}")
    expect(seen[-1].bytes_done == seen[-1].bytes_total, "the last progress report is not complete")
    exc = raises(lambda: a.upload_data("retool-mock-never-created", "x", Path(__file__)), Exception)
    from runtime.modal.adapter import VolumeNotFound
    expect(isinstance(exc, VolumeNotFound), f"an upload to a missing volume raised {type(exc).__name__}: {exc}")
    return f"3 files ({seen[-1].bytes_total} bytes) with progress after each; a missing volume → VolumeNotFound"


def case_volume_listdir(s: Suite) -> str:
    a = s.adapter
    top = {e.path: e for e in a.listdir(VOLUME, "run")}
    expect(set(top) == {"run/one.json", "run/two.json"}, f"listdir run: {sorted(top)}")
    expect(all(not e.is_dir and e.size > 0 for e in top.values()), "file entries are not files with a size")
    deep = {e.path for e in a.listdir(VOLUME, "models/m1", recursive=True) if not e.is_dir}
    expect(deep == {"models/m1/config.json", "models/m1/weights.bin", "models/m1/tokenizer/vocab.txt"},
           f"recursive listdir: {sorted(deep)}")
    shallow = {e.path for e in a.listdir(VOLUME, "models/m1")}
    if "models/m1/tokenizer" not in shallow:
        s.notes.append("listdir: the mock lists files only, never a directory entry (a non-recursive listing "
                       "of models/m1 omits models/m1/tokenizer); Modal lists directories too, "
                       "so retool's is_dir handling was not exercised here")
    expect("models/m1/tokenizer/vocab.txt" not in shallow, "a non-recursive listdir went into a subdirectory")
    raises(lambda: a.listdir(VOLUME, "no/such/dir"), FileNotFoundError)
    return "files with sizes, recursive and not; a missing path → FileNotFoundError"


def case_volume_read_file(s: Suite) -> str:
    a = s.adapter
    expect(a.read_file(VOLUME, "tree/a.txt") == b"A", "read_file returned other bytes")
    raises(lambda: a.read_file(VOLUME, "no/such/file"), FileNotFoundError)
    raises(lambda: a.read_file("retool-mock-never-created", "x"), FileNotFoundError)
    return "content; a missing file or volume → FileNotFoundError"


def case_volume_remove(s: Suite) -> str:
    a = s.adapter
    a.remove(VOLUME, "run/two.json")
    raises(lambda: a.read_file(VOLUME, "run/two.json"), FileNotFoundError)
    raises(lambda: a.remove(VOLUME, "run/two.json"), FileNotFoundError)
    return "a removed file is gone; removing it again → FileNotFoundError"


def case_store(s: Suite) -> str:
    from reconciler.errors import StateLockedError
    from reconciler.state.base import LockInfo, State
    from reconciler.state.modal_store import ModalStore

    clock = [1000.0]
    store = ModalStore("retool-mock-state", "retool-mock-locks", "qwen7b", adapter=s.adapter, clock=lambda: clock[0])
    other = ModalStore("retool-mock-state", "retool-mock-locks", "qwen7b", adapter=s.adapter, clock=lambda: clock[0])
    expect(store.read() is None, "a new store has a state")
    expect(store.lock_info() is None, "a new store is locked")

    def info(lock_id: str) -> LockInfo:
        return LockInfo(id=lock_id, who="ci@runner", user="ci", host="runner", pid=1, command="retool apply",
                        created_at=clock[0])

    lock_id = store.lock(info("lock-a"))
    holder = other.lock_info()
    expect(holder is not None and holder.id == lock_id, "another store does not see the lock")
    err = raises(lambda: other.lock(info("lock-b")), StateLockedError)
    expect("ci@runner" in str(err) or "lock-a" in str(err), f"the conflict does not name the holder: {err}")
    first = State(serial=1, lineage="lin-1")
    store.write(first)
    got = other.read()
    expect(got is not None and got.serial == 1 and got.lineage == "lin-1", f"read back {got}")
    store.write(State(serial=2, lineage="lin-1"))
    backup = json.loads(s.adapter.read_file("retool-mock-state", "qwen7b/state.json.backup"))
    expect(backup["serial"] == 1, "the backup is not the previous state")
    raises(lambda: other.write(State(serial=1, lineage="lin-1")), Exception)  # an older writer is refused
    store.unlock(lock_id)
    expect(other.lock_info() is None, "unlock left the lock")
    # a holder that stopped renewing: its lock expires and the next apply takes it over
    store.lock(info("lock-c"))
    clock[0] += store.lock_ttl_s + 1
    taken = other.lock(info("lock-d"))
    expect(taken == "lock-d" and other.taken_over is not None and other.taken_over.previous.id == "lock-c",
           "an expired lock was not taken over")
    other.unlock(taken)
    return "read/write (serial 1→2, backup kept, older writer refused), lock, conflict named, unlock, expired-lock takeover"


def case_dict_put_if_absent(s: Suite) -> str:
    a = s.adapter
    expect(a.dict_put("retool-mock-launches", "k", "first", skip_if_exists=True) is True, "the first put failed")
    expect(a.dict_put("retool-mock-launches", "k", "second", skip_if_exists=True) is False,
           "put-if-absent overwrote an existing key")
    expect(a.dict_get("retool-mock-launches", "k") == "first", "the first value was not kept")
    expect(a.dict_put("retool-mock-launches", "k", "third") is True, "a plain put was refused")
    expect(a.dict_pop("retool-mock-launches", "k") == "third", "pop did not return the value")
    expect(a.dict_get("retool-mock-launches", "k") is None and a.dict_pop("retool-mock-launches", "k") is None,
           "a popped key is still there")
    return "put-if-absent True then False, value kept, plain put, pop, get of a missing key → None"


def _spec(path: str, fallbacks: dict[str, list[str]] | None = None) -> Any:
    import yaml

    from reconciler.loader import parse_spec_text

    data = yaml.safe_load((REPO / path).read_text())
    for stage, types in (fallbacks or {}).items():
        data["stages"][stage]["resources"]["gpu_fallbacks"] = types
    return parse_spec_text(yaml.safe_dump(data), path)


def _deploy(s: Suite, path: str, fallbacks: dict[str, list[str]] | None = None) -> str:
    import modal

    from runtime.modal.app import build_app_definition

    spec = _spec(path, fallbacks)
    definition = build_app_definition(spec)
    for fn in definition.functions:
        for name in fn.volumes.values():
            s.adapter.create_volume(name, env=definition.environment)
        for secret in fn.secrets:
            modal.Secret.objects.create(secret, {"PLACEHOLDER": "x"}, allow_existing=True)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            s.adapter.deploy(definition)
    except BaseException as exc:
        raise AssertionError(f"deploy raised {type(exc).__name__}: {exc}\n{out.getvalue()[-2000:]}") from exc
    servicer = s.servicer
    env = servicer.get_environment(definition.environment)
    app_id = servicer.deployed_apps.get((env, definition.app_name))
    expect(app_id is not None, f"{definition.app_name} is not deployed")
    objects = servicer.app_objects[app_id]
    expect(set(objects) == {fn.name for fn in definition.functions},
           f"deployed functions {sorted(objects)} != {sorted(fn.name for fn in definition.functions)}")
    checked = []
    for fn in definition.functions:
        stored = servicer.app_functions[objects[fn.name]]
        ranked = [r.function for r in stored.ranked_functions] if hasattr(stored, "ranked_functions") and \
            len(stored.ranked_functions) else [stored]
        first = ranked[0]
        want_gpus = [fn.gpu] if isinstance(fn.gpu, str) else (fn.gpu or [])
        got_gpus = [f"{r.resources.gpu_config.gpu_type}:{r.resources.gpu_config.count}" for r in ranked
                    if r.resources.gpu_config.count]
        want = [g if ":" in g else f"{g}:1" for g in want_gpus]
        expect(got_gpus == [w.upper() for w in want], f"{fn.name}: GPUs {got_gpus} != {want}")
        expect(first.timeout_secs == fn.timeout_s, f"{fn.name}: timeout {first.timeout_secs} != {fn.timeout_s}")
        group = first._experimental_group_size
        expect(group == (fn.cluster_size or 0), f"{fn.name}: cluster size {group} != {fn.cluster_size}")
        if fn.cluster_size:
            expect(all(r.resources.rdma for r in ranked), f"{fn.name}: rdma is off")
        options = dict(stored.experimental_options)
        expect((options.get("efa_enabled") in ("True", "true", "1")) == fn.efa,
               f"{fn.name}: experimental_options {options}, efa {fn.efa}")
        mounts = sorted(m.mount_path for m in first.volume_mounts)
        expect(mounts == sorted(fn.volumes), f"{fn.name}: volume mounts {mounts} != {sorted(fn.volumes)}")
        expect(len(first.secret_ids) >= len(fn.secrets), f"{fn.name}: {len(first.secret_ids)} secrets attached")
        if fn.retries:
            expect(first.retry_policy.retries == fn.retries, f"{fn.name}: retries {first.retry_policy.retries}")
        if fn.memory_mb:
            expect(first.resources.memory_mb == fn.memory_mb, f"{fn.name}: memory {first.resources.memory_mb}")
        checked.append(fn.name)
    clustered = [fn for fn in definition.functions if fn.cluster_size]
    fallback = [fn for fn in definition.functions if isinstance(fn.gpu, list)]
    image = servicer.images[stored.image_id] if getattr(stored, "image_id", "") in servicer.images else None
    s.state.setdefault("deployed", {})[definition.app_name] = definition
    extra = []
    if clustered:
        extra.append(f"{len(clustered)} clustered (size {clustered[0].cluster_size}, rdma, efa_enabled)")
    if fallback:
        extra.append(f"GPU fallbacks {fallback[0].gpu} on {fallback[0].name}")
    if image is not None:
        extra.append(f"image of {len(image.dockerfile_commands)} Dockerfile lines")
    return f"{definition.app_name}: {len(checked)} functions as defined ({'; '.join(extra) or 'no clusters'})"


def case_deploy_7b(s: Suite) -> str:
    return _deploy(s, "specs/retool-qwen7b.yaml", fallbacks={"sft": ["A100-80GB"]})


def case_deploy_32b(s: Suite) -> str:
    return _deploy(s, "specs/retool-qwen32b.yaml")


def _app(s: Suite) -> str:
    """The deployed 7B app the call cases use (deployed here when its case did not run)."""
    if "retool-qwen7b" not in s.state.get("deployed", {}):
        case_deploy_7b(s)
    return "retool-qwen7b"


def case_spawn_running(s: Suite) -> str:
    app = _app(s)
    s.servicer.function_is_running = True
    call_id = s.adapter.spawn(app, "stage-sft", {"segment": 0})
    s.state["running"] = call_id
    expect(call_id.startswith("fc-"), f"call id {call_id}")
    outcome = s.adapter.poll(call_id)
    expect(outcome.state == "running", f"poll of a running call: {outcome}")
    started = time.monotonic()
    waited = s.adapter.wait(call_id, 1.0)
    expect(waited.state == "running", f"wait on a running call: {waited}")
    return f"spawn → {call_id}; poll and wait(1 s, {time.monotonic() - started:.2f} s) → running"


def case_poll_succeeded(s: Suite) -> str:
    app = _app(s)
    s.servicer.function_is_running = False

    @s.servicer.function_body
    def body(payload: dict[str, Any]) -> dict[str, Any]:
        return {"outcome": "finished", "step": 5, "segment": payload["segment"]}

    call_id = s.adapter.spawn(app, "stage-sft", {"segment": 3})
    outcome = s.adapter.poll(call_id)
    expect(outcome.state == "succeeded" and outcome.result == {"outcome": "finished", "step": 5, "segment": 3},
           f"poll of a finished call: {outcome}")
    again = s.adapter.poll(call_id)
    if again.state != "succeeded":
        s.notes.append(f"a finished call polled twice: the mock pops the output on the first poll (then "
                       f"'{again.state}'); Modal keeps it until the result expires")
    return "spawn → poll → succeeded with the function's return value"


def case_poll_failed(s: Suite) -> str:
    app = _app(s)

    @s.servicer.function_body
    def body(payload: dict[str, Any]) -> Any:
        raise ValueError("the stage crashed: CUDA out of memory")

    call_id = s.adapter.spawn(app, "stage-sft", {"segment": 0})
    outcome = s.adapter.poll(call_id)
    expect(outcome.state == "failed" and "CUDA out of memory" in outcome.error, f"poll of a failed call: {outcome}")
    return f"the function's own exception → failed ({outcome.error[:60]})"


def case_poll_unknown_id(s: Suite) -> str:
    outcome = s.adapter.poll("fc-01RETOOLMOCKUNKNOWN00000")
    expect(outcome.state == "expired", f"an unknown call id polled as {outcome}")
    return "an unknown id → expired (OutputExpiredError), as the adapter's docstring says"


def case_cancel(s: Suite) -> str:
    if "running" not in s.state:
        case_spawn_running(s)
    call_id = s.state["running"]
    s.adapter.cancel(call_id)
    expect(call_id in s.servicer.cancelled_calls, "the mock did not receive the cancel")
    outcome = s.adapter.poll(call_id)
    expect(outcome.state == "terminated", f"a cancelled call polled as {outcome}")
    return "cancel(terminate_containers=True) reached the server; the TERMINATED result → terminated"


def case_poll_conflict(s: Suite) -> str:
    from runtime.modal.adapter import ModalUnreachable

    call_id = "fc-01RETOOLMOCKCONFLICT000"
    with s.servicer.intercept() as ctx:
        ctx.add_response("FunctionGetOutputs", s.server.mock.GRPCError(s.server.mock.Status.FAILED_PRECONDITION,
                                                                        "conflict"))
        err = raises(lambda: s.adapter.poll(call_id), ModalUnreachable)
    return f"gRPC FAILED_PRECONDITION → the client's ConflictError → ModalUnreachable ({err.args[0][:40]}…)"


def case_web_url_not_web(s: Suite) -> str:
    from reconciler.errors import TerminalError

    app = _app(s)
    err = raises(lambda: s.adapter.web_url(app, "stage-sft"), TerminalError)
    expect("None" not in str(err).split(":")[0], f"the message reads {err}")
    return f"a non-web function → TerminalError ({err.args[0]})"


def case_function_stats(s: Suite) -> str:
    from modal_proto import api_pb2

    app = _app(s)
    with s.servicer.intercept() as ctx:
        ctx.add_response("FunctionGetCurrentStats",
                         api_pb2.FunctionStats(backlog=3, num_total_tasks=2))
        stats = s.adapter.function_stats(app, "stage-sft")
    expect((stats.backlog, stats.runners) == (3, 2), f"stats {stats}")
    none = s.adapter.function_stats(app, "no-such-function")
    expect((none.backlog, none.runners) == (0, 0), f"stats of an undeployed function {none}")
    s.notes.append("FunctionGetCurrentStats is not implemented by the mock: answered through its own "
                   "intercept() with backlog=3, num_total_tasks=2")
    return "backlog 3 / runners 2 read from the answer; an undeployed function → nothing queued"


def case_stop_app(s: Suite) -> str:
    app = _app(s)
    env = s.servicer.get_environment(None)
    s.adapter.stop_app(app)
    expect((env, app) not in s.servicer.deployed_apps, "the app is still deployed")
    s.adapter.stop_app(app)  # not deployed any more: nothing to do
    s.adapter.stop_app("retool-never-deployed")
    return "the app stopped; stopping it again, or an app never deployed, is a no-op"


def case_container_commit_reload(s: Suite) -> str:
    from runtime.modal.adapter import SdkAdapter

    servicer = s.servicer
    vol_id = servicer.deployed_volumes[(VOLUME, servicer.get_environment(None))]
    with environment(container_env(servicer)):
        inside = SdkAdapter(call_timeout_s=CALL_TIMEOUT_S)
        expect(inside.credentials_problem() is None, "a container without a token reports a credentials problem")
        before = (servicer.volume_commits[vol_id], servicer.volume_reloads[vol_id])
        inside.reload_volume(VOLUME)
        inside.commit_volume(VOLUME)
        after = (servicer.volume_commits[vol_id], servicer.volume_reloads[vol_id])
        expect(after == (before[0] + 1, before[1] + 2), f"commits/reloads {before} → {after}")
        refused = "there are open files preventing the operation"
        with servicer.intercept() as ctx:
            ctx.add_response("VolumeReload", s.server.mock.GRPCError(s.server.mock.Status.FAILED_PRECONDITION, refused))
            err = raises(lambda: inside.reload_volume(VOLUME), RuntimeError)
        expect(refused in str(err), f"the refusal reads {err}")
        with servicer.intercept() as ctx:
            ctx.add_response("VolumeReload", s.server.mock.GRPCError(s.server.mock.Status.FAILED_PRECONDITION, refused))
            err = raises(lambda: inside.commit_volume(VOLUME), RuntimeError)
    return ("reload = VolumeReload; commit = VolumeCommit then a reload (1.6.4); a reload refused for open files "
            "→ RuntimeError from reload and from commit, as the fake raises")


def case_container_call_id(s: Suite) -> str:
    from modal._runtime.execution_context import _set_current_context_ids

    from runtime.modal.adapter import SdkAdapter

    with environment(container_env(s.servicer)):
        inside = SdkAdapter()
        expect(inside.current_call_id() is None, "outside an input the call id is not None")
        reset = _set_current_context_ids(["in-1"], ["fc-retool-current"], ["at-1"])
        try:
            got = inside.current_call_id()
        finally:
            reset()
    expect(got == "fc-retool-current", f"current_call_id {got}")
    return "None outside an input; the input's function call id inside one"


def case_container_cluster_info(s: Suite) -> str:
    import modal.exception
    from modal import _cluster
    from modal_proto import api_pb2

    from runtime.modal.adapter import SdkAdapter

    servicer = s.servicer
    with environment({**container_env(servicer), "MODAL_CLOUD_PROVIDER": "CLOUD_PROVIDER_AWS"}):
        inside = SdkAdapter()
        raises(inside.cluster_info, modal.exception.InvalidError)
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "i6pn.modal.local":  # Modal's container network names this container's IPv6 address
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fdaa::2", 0, 0, 0))]
            return real_getaddrinfo(host, *args, **kwargs)

        hello = api_pb2.TaskClusterHelloResponse(cluster_id="cl-retool", cluster_rank=1,
                                                 container_ips=["fdaa::1", "fdaa::2"],
                                                 container_ipv4_ips=["10.0.0.1", "10.0.0.2"])
        socket.getaddrinfo = getaddrinfo
        try:
            with servicer.intercept() as ctx:
                ctx.add_response("TaskClusterHello", hello)
                import modal

                _cluster.initialize_clustered_function(modal.Client.from_env(), "ta-retool-mock")
            info = inside.cluster_info()
        finally:
            socket.getaddrinfo = real_getaddrinfo
            _cluster.current_cluster_context = None
    expect((info.rank, info.cluster_id) == (1, "cl-retool"), f"cluster info {info}")
    expect(info.ips == ["fdaa::1", "fdaa::2"] and info.ipv4_ips == ["10.0.0.1", "10.0.0.2"], f"addresses {info}")
    s.notes.append("TaskClusterHello is not implemented by the mock: modal's own cluster start-up ran with the "
                   "answer given through intercept()")
    return "outside a cluster → InvalidError; after modal's cluster start-up: rank 1 of 2 with IPv6 and IPv4 addresses"


def case_secret_problem(s: Suite) -> str:
    import modal

    a = s.adapter
    missing = a.secret_problem("retool-mock-no-such-secret", ["HF_TOKEN"])
    expect(missing is not None and "retool-mock-no-such-secret" in missing, f"a missing secret: {missing!r}")
    modal.Secret.objects.create("retool-mock-hf", {"HF_TOKEN": "x"})
    expect(a.secret_problem("retool-mock-hf", ["HF_TOKEN"]) is None, "an existing secret has a problem")
    absent_key = a.secret_problem("retool-mock-hf", ["WANDB_API_KEY"])
    if absent_key is None:
        s.notes.append("Secret.from_name(required_keys=...): the mock ignores required_keys, so a secret "
                       "lacking a key reads as fine here; Modal's server checks them")
    return "a missing secret → a problem naming it; an existing one → None"


def case_gpu_rates(s: Suite) -> str:
    from modal_proto import api_pb2

    with s.servicer.intercept() as ctx:
        ctx.add_response("WorkspaceBillingRates", api_pb2.WorkspaceBillingRatesResponse(
            rates={"gpu.h100": "0.001097", "gpu.a100-80gb": "0.000694", "cpu": "0.0000131"}))
        rates = s.adapter.gpu_rates()
    expect(abs(rates.get("H100", 0) - 3.9492) < 1e-3 and "A100-80GB" in rates and len(rates) >= 2,
           f"rates {rates}")
    s.notes.append("billing rates: the mock's answer has no GPU keys (normal_key, warning_key); the keys asked "
                   "here (gpu.h100...) are retool's guess at Modal's naming, not Modal's")
    return f"per-second GPU prices → USD per GPU-hour (H100 {rates['H100']:.2f}); non-GPU keys ignored"


def case_build_image(s: Suite) -> str:
    from runtime.modal.app import build_app_definition

    definition = build_app_definition(_spec("specs/retool-qwen7b.yaml"))
    servicer = s.servicer
    before = set(servicer.images)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        image_id = s.adapter.build_image_now(definition.image, env="retool-mock-env")
    expect(image_id.startswith("im-"), f"image id {image_id!r}")
    new = set(servicer.images) - before
    expect(bool(new) or image_id in servicer.images, "no image was built")
    envs = [servicer.app_environments[a] for a in servicer.app_environments]
    expect("retool-mock-env" in envs, f"the build app ran in {envs}, not the spec's environment")
    return f"{image_id} built in an app of the spec's environment (retool-mock-env)"


CASES: list[tuple[str, Callable[[Suite], str]]] = [
    ("connection: check_connection / bad token", case_connection),
    ("volume: create / exists / delete", case_volume_create),
    ("volume: put_files", case_volume_put_files),
    ("volume: upload_data", case_volume_upload_data),
    ("volume: listdir", case_volume_listdir),
    ("volume: read_file", case_volume_read_file),
    ("volume: remove", case_volume_remove),
    ("store: ModalStore read/write/lock/unlock", case_store),
    ("dict: put-if-absent", case_dict_put_if_absent),
    ("secret_problem", case_secret_problem),
    ("build_image_now in the spec's environment", case_build_image),
    ("gpu_rates", case_gpu_rates),
    ("deploy: 7B app (GPU fallbacks)", case_deploy_7b),
    ("deploy: 32B app (clusters of 2, rdma, EFA)", case_deploy_32b),
    ("calls: spawn / poll / wait running", case_spawn_running),
    ("calls: poll succeeded", case_poll_succeeded),
    ("calls: poll failed", case_poll_failed),
    ("calls: poll unknown id", case_poll_unknown_id),
    ("calls: cancel → terminated", case_cancel),
    ("calls: poll conflict", case_poll_conflict),
    ("web_url of a non-web function", case_web_url_not_web),
    ("function_stats", case_function_stats),
    ("stop_app", case_stop_app),
    ("container: reload / commit", case_container_commit_reload),
    ("container: current_call_id", case_container_call_id),
    ("container: cluster_info", case_container_cluster_info),
]


def run_cases(suite: Suite, only: list[str]) -> list[Outcome]:
    outcomes = []
    for name, fn in CASES:
        if only and not any(o in name for o in only):
            continue
        try:
            with environment(client_env(suite.servicer)):
                why = fn(suite)
            outcomes.append(Outcome(name, "PASS", why))
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError) else str(exc)
            if os.environ.get("RETOOL_MOCK_TRACEBACK"):
                traceback.print_exc()
            outcomes.append(Outcome(name, "FAIL", detail))
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'case':<{width}}  result  why", f"{'-' * width}  ------  ---"]
    for o in outcomes:
        why = " ".join(o.why.split())
        lines.append(f"{o.name:<{width}}  {o.status:<6}  {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a modal-labs/modal-client checkout (or a bare git dir)")
    parser.add_argument("--only", action="append", default=[], help="run the cases whose name contains this")
    args = parser.parse_args(argv)

    import modal

    from runtime.modal.adapter import SdkAdapter

    with tempfile.TemporaryDirectory(prefix="retool-modal-mock-") as work:
        source = locate(args.checkout.resolve(), Path(work))
        mock = load_conftest(source.conftest)
        adaptations = adapt(mock)
        modal.config._user_config = {}  # never a real profile from ~/.modal.toml (the conftest does the same)
        print(f"modal client (installed): {modal.__version__}")
        print(f"mock server: modal-client {source.client_version} at commit {source.commit}, "
              f"{CONFTEST} sha256 {source.sha256[:16]}")
        print("adapted at run time to the installed client:")
        for line in adaptations:
            print(f"  - {line}")
        with MockServer(mock) as server:
            suite = Suite(server, SdkAdapter(call_timeout_s=CALL_TIMEOUT_S))
            outcomes = run_cases(suite, args.only)
    print()
    print(table(outcomes))
    if suite.notes:
        print("\nwhere the mock is not Modal (checked no further here):")
        for note in suite.notes:
            print(f"  - {note}")
    failed = [o for o in outcomes if o.status != "PASS"]
    print(f"\n{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
