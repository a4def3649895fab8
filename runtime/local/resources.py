"""The local backend's non-stage resources: the recorded Python environment (what `image`
means on this machine), prepared datasets and models (idempotent through a stamp beside
each), and the sandbox sidecar process.

Each function observes what exists first and says `created | unchanged | updated`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reconciler.errors import TerminalError
from reconciler.spec import Dataset, Image, Model, Sandbox
from runtime import processes as procs
from runtime import records
from reconciler.backend import Outcome
from runtime.stamps import restart_config, short_hash
from runtime.atomic import write_text_atomic
from runtime.records import EnvironmentRecord, PreparedDir, SandboxRecord

KEY_PACKAGES = ("verl", "torch", "transformers", "ray", "vllm", "sglang", "flash-attn", "tokenizers", "pyarrow")
# Sandbox settings that matter to a local server (replicas, cpu, memory_mb, placement are Modal's).
LOCAL_SANDBOX_FIELDS = {"workers", "max_queue", "preload", "memory_limit_mb", "max_output_bytes", "port", "token_secret"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- environment ("image")


def environment_record(image: Image, *, device: str, needs_training: bool) -> tuple[EnvironmentRecord, list[str]]:
    """This interpreter and its key packages (what a local `image` is), and where they
    differ from `image.pip`'s pins. Raises when training is needed but verl/torch are missing."""
    from importlib import metadata

    packages: dict[str, str] = {}
    for name in KEY_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if needs_training and ("verl" not in packages or "torch" not in packages):
        raise TerminalError(
            "this Python environment lacks verl or torch", f"python {sys.executable}",
            "pip install -c constraints.txt -e '.[train]'",
        )
    facts: dict[str, Any] = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "packages": packages,
        "device": device,
    }
    return EnvironmentRecord(**facts, digest=short_hash(facts)), pin_mismatches(image.pip, packages)


def pin_mismatches(requirements: list[str], installed: dict[str, str]) -> list[str]:
    from packaging.requirements import InvalidRequirement, Requirement

    notes = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        have = installed.get(req.name)
        if have is not None and req.specifier and have not in req.specifier:
            notes.append(f"{req.name} {have} (image wants {req.specifier})")
    return notes


def record_environment(path: Path, image: Image, *, device: str, needs_training: bool) -> Outcome:
    record, notes = environment_record(image, device=device, needs_training=needs_training)
    try:
        previous = records.load(EnvironmentRecord, path)
    except records.RecordError:  # unreadable: recorded anew
        previous = None
    same = previous is not None and previous.model_copy(update={"version": record.version}) == record
    change = "unchanged" if same else ("updated" if path.exists() else "created")
    if change != "unchanged":
        records.save(path, record)
    pk = record.packages
    message = f"python {record.python}, verl {pk.get('verl')}, torch {pk.get('torch')}, {device}"
    if notes:
        message += "; differs from image.pip: " + ", ".join(notes)
    return Outcome(change=change, outputs=record.model_dump(exclude={"version"}), message=message)


# --------------------------------------------------------------------------- datasets and models


def source_stat(source: str, spec_dir: str) -> list[Any] | None:
    """Size and mtime of a `path:` source's files (a changed file re-prepares)."""
    if not source.startswith("path:"):
        return None
    path = Path(source[5:]).expanduser()
    path = path if path.is_absolute() else Path(spec_dir) / path
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def prepare_once(
    config: Dataset | Model, out_dir: Path, spec_dir: str,
    read: Callable[[Path], BaseModel | None], prepare: Callable[[], BaseModel], describe: Callable[[Any], str],
) -> Outcome:
    """Run `prepare` unless `out_dir` already holds what this config produces.

    The stamp `.<name>.prepared.json` beside `out_dir` ties the directory's digest (checked
    by `read`, which recomputes it) to the restart fields and `path:` source files it was
    made from; any difference re-prepares."""
    stamp_path = out_dir.parent / f".{out_dir.name}.prepared.json"
    made_from = short_hash({"config": restart_config(config), "source": source_stat(config.source, spec_dir)})
    existing = read(out_dir)
    if existing is not None and _stamp(stamp_path) == (made_from, getattr(existing, "digest", None)):
        return Outcome(change="unchanged", outputs=existing.model_dump(), message=describe(existing))
    outputs = prepare()
    records.save(stamp_path, PreparedDir(config=made_from, digest=getattr(outputs, "digest", None)))
    return Outcome(
        change="updated" if existing is not None else "created", outputs=outputs.model_dump(), message=describe(outputs)
    )


def _stamp(path: Path) -> tuple[str, str | None] | None:
    try:
        stamp = records.load(PreparedDir, path)
    except records.RecordError:  # unreadable: prepared anew
        return None
    return None if stamp is None else (stamp.config, stamp.digest)


# --------------------------------------------------------------------------- sandbox sidecar
#
# The sidecar never outlives its use: it exits by itself when the state directory it belongs
# to is gone, and after SIDECAR_IDLE_TIMEOUT_S without a request once no lease holds it up.
# Each process that ensures it or looks it up takes a lease (its own pid), so it stays while
# an apply waits on the stages that call it; a later plan sees it gone and plans its `create`.

SIDECAR_IDLE_TIMEOUT_S = 600.0
SIDECAR_LIFETIME = {"idle_timeout_s": SIDECAR_IDLE_TIMEOUT_S, "owner_dir": True, "leases": True}  # in the hash:
# a sidecar started without these rules (by an older retool) is replaced, not kept forever.


def ping(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/v1/ping", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _load(path: Path) -> SandboxRecord | None:
    try:
        return records.load(SandboxRecord, path)
    except records.RecordError:  # a record of an older retool (no pid): start anew, as it always did
        return None


def live_sandbox_url(record_path: Path, *, hold: bool = True) -> str | None:
    """The recorded sidecar's URL if that very process still runs and answers. With `hold`
    (an apply that will call it: preparing data, launching a stage) this process holds it up
    by a lease while it runs; plan, status and render only look (they stay read-only)."""
    record = _load(record_path)
    if record is not None and procs.is_alive(record.pid, record.start_ticks) and ping(record.url):
        if hold:
            take_lease(record_path.parent)
        return record.url
    return None


def ensure_sandbox(sandbox: Sandbox, record_path: Path, log_dir: Path) -> Outcome:
    """Find the recorded sidecar (same process, answering, same settings) or (re)start it."""
    from runtime import sandbox_process

    config_hash = short_hash({
        **sandbox.model_dump(mode="json", include=LOCAL_SANDBOX_FIELDS), "lifetime": SIDECAR_LIFETIME,
    })
    state_dir = record_path.parent
    take_lease(state_dir)  # before anything is started: the sidecar must not idle out under us
    record = _load(record_path)
    change = "created"
    if record is not None and procs.is_alive(record.pid, record.start_ticks):
        if record.config_hash == config_hash and ping(record.url):
            return Outcome(change="unchanged", outputs={"url": record.url, "pid": record.pid})
        # Other settings, or alive but not answering (hung): stop it, or it would be left
        # running and keep holding the port. The server leads its own process group.
        procs.terminate_run(record.pid, grace_s=10)
        change = "updated"
    elif record is not None:
        change = "updated"  # recorded but dead: restart it
    log_path = log_dir / f"sandbox-{time.strftime('%Y%m%d-%H%M%S')}.log"
    started = sandbox_process.start_detached(  # waits until /v1/ping answers
        "127.0.0.1", sandbox.port, log_path, workers=sandbox.workers, memory_limit_mb=sandbox.memory_limit_mb,
        max_output_bytes=sandbox.max_output_bytes, max_queue=sandbox.max_queue, preload=list(sandbox.preload),
        settings_env=sidecar_lifetime_env(state_dir),
    )
    new = SandboxRecord(
        pid=started.pid, url=started.url, start_ticks=procs.start_ticks(started.pid),
        config_hash=config_hash, log_path=str(log_path),
    )
    records.save(record_path, new)
    return Outcome(change=change, outputs={"url": new.url, "pid": new.pid}, message=f"sandbox at {new.url}")


def lease_dir(state_dir: Path) -> Path:
    return state_dir / "sandbox-leases"


def sidecar_lifetime_env(state_dir: Path) -> dict[str, str]:
    """The server's own rules for ending (sandbox.lifetime), as RETOOL_SANDBOX_* variables."""
    return {
        "RETOOL_SANDBOX_OWNER_DIR": str(state_dir.resolve()),
        "RETOOL_SANDBOX_IDLE_TIMEOUT_S": str(SIDECAR_IDLE_TIMEOUT_S),
        "RETOOL_SANDBOX_LEASE_DIR": str(lease_dir(state_dir).resolve()),
    }


def take_lease(state_dir: Path, pid: int | None = None) -> Path:
    """Hold the sidecar up while process `pid` (default: this one) runs: '<pid> <start ticks>'."""
    pid = os.getpid() if pid is None else pid
    path = lease_dir(state_dir) / str(pid)
    write_text_atomic(path, f"{pid} {procs.start_ticks(pid) or ''}".strip() + "\n")
    return path
