"""Pick the runtime for a spec's backend, importing it only when asked for.

Backends import heavy things (modal, torch, verl) lazily inside their methods; this module
imports the backend module itself lazily too, so `retool plan` on one backend never pays
for another. Tests swap in a runtime with `set_runtime_override(factory)` or, across
processes, `RETOOL_TEST_RUNTIME=module:factory` (factory(spec, state_dir) -> Runtime).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from reconciler.errors import TerminalError
from reconciler.spec import Spec
from reconciler.state.base import StateStore
from reconciler.state.local import LocalStore
from reconciler.backend import Runtime

RuntimeFactory = Callable[[Spec, str], Runtime]
OVERRIDE_ENV = "RETOOL_TEST_RUNTIME"

# backend name -> (module, class); each class takes `state_dir=`.
BACKENDS: dict[str, tuple[str, str]] = {
    "local": ("runtime.local.backend", "LocalRuntime"),
    "modal": ("runtime.modal.backend", "ModalRuntime"),
    "ray": ("runtime.ray.backend", "RayRuntime"),
}
# The Modal SDK adapter the shared state store is handed (it imports `modal` lazily itself).
MODAL_ADAPTER = ("runtime.modal.adapter", "SdkAdapter")

_override: RuntimeFactory | None = None


def set_runtime_override(factory: RuntimeFactory | None) -> None:
    """Make every `get_runtime` call use `factory` (None restores the real backends)."""
    global _override
    _override = factory


def _env_override() -> RuntimeFactory | None:
    target = os.environ.get(OVERRIDE_ENV, "").strip()
    if not target:
        return None
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise TerminalError(f"{OVERRIDE_ENV}={target!r} is not `module:factory`")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TerminalError(f"{OVERRIDE_ENV}={target!r} cannot be loaded", str(exc)) from exc


def get_runtime(spec: Spec, state_dir: str | Path) -> Runtime:
    """The runtime for `spec.backend`, keeping its local files under `state_dir`."""
    factory = _override or _env_override()
    if factory is not None:
        return factory(spec, str(state_dir))
    module_name, class_name = BACKENDS[spec.backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise TerminalError(
                f"The {spec.backend} backend is not installed",
                f"module {module_name} is missing from this installation",
                "reinstall retool from a full checkout (`pip install -e .`)",
            ) from exc
        hint = "install the Modal extra: `pip install 'retool[modal]'`" if spec.backend == "modal" else (
            "install the training extra: `pip install -c constraints.txt -e '.[train]'`"
        )
        raise TerminalError(
            f"The {spec.backend} backend cannot be loaded: {exc.name} is not installed", str(exc), hint
        ) from exc
    runtime_class = getattr(module, class_name, None)
    if runtime_class is None:
        raise TerminalError(
            f"The {spec.backend} backend is incomplete", f"{module_name} defines no {class_name}",
            "update retool to a version that ships this backend",
        )
    return runtime_class(state_dir=str(state_dir))


def get_store(spec: Spec, state_dir: str | Path) -> StateStore:
    """The state store the spec asks for: a local file in `state_dir`, the shared file on a
    Modal Volume (teams and CI; imports the Modal SDK only when used), or the shared file in
    the Ray cluster's storage directory."""
    if spec.state.store == "local":
        return LocalStore(state_dir)
    if spec.state.store == "ray":
        from reconciler.state.shared_dir import SharedDirStore

        return SharedDirStore.from_spec(spec)
    from reconciler.state.modal_store import ModalStore

    module_name, class_name = MODAL_ADAPTER
    try:
        adapter = getattr(importlib.import_module(module_name), class_name)()
    except ModuleNotFoundError as exc:
        raise TerminalError(
            "The Modal state store cannot be loaded", str(exc), "install the Modal extra: `pip install 'retool[modal]'`"
        ) from exc
    return ModalStore.from_spec(spec, adapter)
