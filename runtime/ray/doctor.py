"""`retool doctor SPEC` for the Ray backend: the cluster answers at `ray.address`, its Ray
is the client's version, it has the GPUs the spec's stages ask for, and `ray.storage` is
writable here and from every node (a short Ray job writes a file from each node); then
the state store rows every backend shares."""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from reconciler.errors import RetoolError
from reconciler.readiness import DoctorCheck as Check
from reconciler.readiness import store_checks
from reconciler.spec import Spec
from reconciler.state.base import StateStore
from runtime.ray import cluster, jobs

if TYPE_CHECKING:
    from runtime.ray.backend import RayRuntime

PROBE_TIMEOUT_S = 180.0


def _why(exc: Exception) -> str:
    return exc.summary if isinstance(exc, RetoolError) else f"{type(exc).__name__}: {exc}"


def doctor_checks(runtime: RayRuntime, spec: Spec, open_store: Callable[[], StateStore]) -> list[Check]:
    rows: list[Check] = []
    try:
        address = jobs.address_of(spec)
        versions = cluster.versions(address)
    except Exception as exc:  # noqa: BLE001 - any failure here is the row's answer
        rows.append(Check(check="ray cluster", status="to fix", detail=_why(exc),
                          fix="start the cluster (`ray start --head --dashboard-host=0.0.0.0`) and set `ray.address`"))
        return rows + [Check(check="ray nodes", status="skipped", detail="no cluster"),
                       Check(check="ray storage", status="skipped", detail="no cluster")] + store_checks(open_store)
    client_version, cluster_version = versions
    rows.append(Check(
        check="ray cluster", status="ready" if client_version == cluster_version else "to fix",
        detail=f"{address}: Ray {cluster_version} on the cluster, {client_version} here",
        fix="" if client_version == cluster_version else f"install ray=={cluster_version} here (the Jobs API client)",
    ))
    nodes = cluster.nodes(address)
    rows.append(Check(check="ray nodes", status="ready" if nodes else "to fix", detail=cluster.describe(nodes),
                      fix="" if nodes else "no alive node: start them with `ray start --address=<head>`"))
    for name, stage in spec.stages.items():
        problem = cluster.fit_problem(stage, nodes)
        rows.append(Check(
            check=f"stage.{name} GPUs", status="to fix" if problem else "ready",
            detail=problem or cluster.need_text(stage), fix="add such nodes, or change the stage's resources" if problem else "",
        ))
    rows.append(storage_check(runtime, spec, [n.node_id for n in nodes]))
    return rows + store_checks(open_store)


def storage_check(runtime: RayRuntime, spec: Spec, node_ids: list[str]) -> Check:
    """A job writes `<storage>/.retool-doctor/<probe>/<node id>` from every node; this
    machine reads them."""
    storage = runtime.storage(spec)
    probe = storage / ".retool-doctor" / uuid.uuid4().hex[:12]
    try:
        probe.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return Check(check="ray storage", status="to fix", detail=f"{storage} is not writable here: {exc}",
                     fix="mount the shared storage at the same path on this machine")
    jc = runtime._client(spec)
    sid = f"retool-{jobs.slug(spec.name)}-doctor-{probe.name}"
    jobs.submit(jc, sid, entrypoint=shlex.join(["python", "-m", "runtime.ray.cluster", str(probe), *node_ids]),
                runtime_env=runtime.runtime_env(spec), entrypoint_num_cpus=0,
                metadata={"retool_spec": spec.name, "retool_node": "doctor"})
    deadline, job = time.time() + PROBE_TIMEOUT_S, None
    while time.time() < deadline:
        job = jobs.job_info(jc, sid)
        if job is not None and jobs.status_name(job) in jobs.TERMINAL:
            break
        time.sleep(1.0)
    seen = {p.name for p in probe.iterdir()}
    missing = [n for n in node_ids if n not in seen]
    for p in probe.iterdir():
        p.unlink()
    probe.rmdir()
    if missing or job is None or jobs.status_name(job) != "SUCCEEDED":
        state = jobs.status_name(job) if job is not None else "unknown"
        return Check(
            check="ray storage", status="to fix",
            detail=f"{storage}: not written from node(s) {', '.join(m[:12] for m in missing) or '-'} (probe job {state})",
            fix="mount the same shared filesystem at the same path on every node",
        )
    return Check(check="ray storage", status="ready", detail=f"{storage} is written from all {len(node_ids)} node(s) and read here")
