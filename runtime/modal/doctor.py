"""`retool doctor SPEC` for the Modal backend: is this workspace ready for the spec's first
apply? Each check returns a row (ready / to fix / skipped, what was seen, how to fix it).

Order matters: the token is looked at locally first (no network, no `import modal`), so
without one the answer comes at once and every other row says it was skipped; then one
short round trip proves the token and the network; then secrets (with their keys), GPU
types, the image (built eagerly, no function runs), volumes, the state store and its lock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reconciler.errors import RetoolError
from reconciler.readiness import DoctorCheck as Check
from reconciler.readiness import store_checks
from reconciler.spec import Spec
from reconciler.state.base import StateStore
from runtime.modal.adapter import LOGIN_HINT, ModalAdapter
from runtime.modal.layout import modal_volume_name
from runtime.modal.app import build_app_definition, modal_problems, modal_warnings
from runtime.modal.limits import gpu_problem, parse_gpu

CONNECT_TIMEOUT_S = 4.0


def _why(exc: Exception) -> str:
    return exc.summary if isinstance(exc, RetoolError) else f"{type(exc).__name__}: {exc}"


def modal_checks(
    spec: Spec, adapter: ModalAdapter, store: Callable[[], StateStore], *, repo_root: Path,
    build_image: bool = True, store_on_modal: bool = True,
) -> list[Check]:
    """Every row for a Modal spec. `store` opens the state store (a store on Modal is only
    opened once the token is proven)."""
    rows = [spec_check(spec, repo_root), *[Check(check="spec", status="note", detail=w) for w in modal_warnings(spec)]]
    rows += gpu_checks(spec, adapter=None)
    problem = adapter.credentials_problem()
    later = ["connection", "secrets", "image", "volumes"]
    if store_on_modal:
        later += ["state store", "state lock"]
    else:
        rows += store_checks(store)
    if problem:
        rows.insert(0, Check(check="Modal token", status="to fix", detail=problem, fix=LOGIN_HINT))
        return rows + [Check(check=name, status="skipped", detail="needs a Modal token") for name in later]
    rows.insert(0, Check(check="Modal token", status="ready", detail="found (not yet verified)"))
    try:
        adapter.check_connection(CONNECT_TIMEOUT_S)
    except RetoolError as exc:
        rows.append(Check(check="connection", status="to fix", detail=_why(exc), fix=exc.hint))
        return rows + [Check(check=name, status="skipped", detail="Modal did not answer") for name in later[1:]]
    rows.append(Check(check="connection", status="ready", detail="the token works"))
    rows += secret_checks(spec, adapter)
    rows += gpu_checks(spec, adapter=adapter)
    rows.append(image_check(spec, adapter) if build_image else
                Check(check="image", status="skipped", detail="--skip-build: not built now"))
    rows += cluster_checks(spec, adapter, build_image=build_image and rows[-1].status == "ready")
    rows += volume_checks(spec, adapter)
    if store_on_modal:
        rows += store_checks(store)
    return rows


def spec_check(spec: Spec, repo_root: Path) -> Check:
    problems = modal_problems(spec, repo_root)
    if problems:
        return Check(check="spec", status="to fix", detail="; ".join(problems), fix="edit the fields named above")
    return Check(check="spec", status="ready", detail="GPU types and counts, timeouts, image and sources pass Modal's rules")


def referenced_secrets(spec: Spec) -> list[str]:
    """Keys of `secrets` that something in the spec uses (stages, the sandbox, data and model preparation)."""
    used = {s for stage in spec.stages.values() for s in getattr(stage, "secrets", [])}
    if spec.sandbox is not None and spec.sandbox.token_secret:
        used.add(spec.sandbox.token_secret)
    used |= {k for k, ref in spec.secrets.items() if {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(ref.env)}
    return sorted(k for k in used if k in spec.secrets)


def secret_checks(spec: Spec, adapter: ModalAdapter) -> list[Check]:
    rows: list[Check] = []
    for key in referenced_secrets(spec):
        ref = spec.secrets[key]
        name = ref.modal_name or key
        label = f"secret {name}"
        try:
            problem = adapter.secret_problem(name, list(ref.env), env=spec.modal.environment)
        except RetoolError as exc:
            rows.append(Check(check=label, status="to fix", detail=_why(exc), fix=exc.hint))
            continue
        if problem:
            values = " ".join(f"{var}=..." for var in ref.env)
            rows.append(Check(check=label, status="to fix", detail=problem, fix=f"modal secret create {name} {values}"))
        else:
            rows.append(Check(check=label, status="ready", detail=f"has {', '.join(ref.env)}"))
    return rows


def gpu_checks(spec: Spec, *, adapter: ModalAdapter | None) -> list[Check]:
    """Offline: each GPU string is one Modal offers (documented types and counts). Online
    (`adapter` given): types the workspace's billing rates do not list are noted."""
    wanted: dict[str, list[str]] = {}
    for name, stage in spec.stages.items():
        res = stage.resources
        for gpu_type in [res.gpu, *res.gpu_fallbacks] if res.gpu else []:
            wanted.setdefault(f"{gpu_type}:{res.gpus_per_node}", []).append(name)
    if adapter is None:
        return [
            Check(check=f"GPU {gpu}", status="to fix" if gpu_problem(gpu) else "ready",
                  detail=gpu_problem(gpu) or f"offered by Modal (stages {', '.join(stages)})")
            for gpu, stages in sorted(wanted.items())
        ]
    try:
        rates = adapter.gpu_rates()
    except (RetoolError, OSError) as exc:
        return [Check(check="GPU prices", status="note", detail=f"billing rates unavailable ({_why(exc)}); "
                                                              "plan uses the spec's price table")]
    missing = sorted({parse_gpu(g).type for g in wanted} - {t.upper() for t in rates})  # rates: by GPU type
    if missing:
        return [Check(check="GPU prices", status="note", detail=f"the workspace's billing rates list no {', '.join(missing)}")]
    return [Check(check="GPU prices", status="ready", detail="from the workspace's billing rates")]


def image_check(spec: Spec, adapter: ModalAdapter) -> Check:
    steps = build_app_definition(spec).image
    try:
        image_id = adapter.build_image_now(steps, env=spec.modal.environment)
    except RetoolError as exc:
        return Check(check="image", status="to fix", detail=_why(exc), fix=exc.hint)
    except Exception as exc:  # noqa: BLE001 - the build's own error (ImageBuildError, a failed pip step)
        return Check(check="image", status="to fix", detail=f"{type(exc).__name__}: {exc}"[-500:],
                     fix="read the build log above; change image.base / image.pip")
    return Check(check="image", status="ready", detail=f"built {image_id} from {spec.image.base} (cached for apply)")


CLUSTER_ACCESS_HINT = ("Modal's multi-node clusters are in preview and need access on request (Modal's Slack or "
                       "support@modal.com); until then run the stage with resources.nodes: 1")


def cluster_checks(spec: Spec, adapter: ModalAdapter, *, build_image: bool) -> list[Check]:
    """Whether Modal creates the spec's clustered functions: they are deployed in a probe app of
    their own (nothing runs: a deploy starts no container), which is stopped right after."""
    definition = build_app_definition(spec)
    clustered = [fn for fn in definition.functions if fn.cluster_size]
    if not clustered:
        return []
    sizes = ", ".join(sorted({f"{fn.cluster_size} x {fn.gpu}" for fn in clustered}))
    if not build_image:
        return [Check(check="multi-node clusters", status="skipped",
                      detail=f"needs the image built to deploy a probe ({sizes}); {CLUSTER_ACCESS_HINT}")]
    # the probe mounts nothing and needs no secrets: volumes are apply's to create
    probe_functions = [fn.model_copy(update={"volumes": {}, "secrets": []}) for fn in clustered]
    probe = definition.model_copy(update={"app_name": f"{definition.app_name}-cluster-probe",
                                          "functions": probe_functions})
    try:
        adapter.deploy(probe)
    except RetoolError as exc:
        return [Check(check="multi-node clusters", status="to fix", detail=_why(exc), fix=exc.hint)]
    except Exception as exc:  # noqa: BLE001 - Modal's refusal of the clustered functions
        return [Check(check="multi-node clusters", status="to fix", detail=f"{type(exc).__name__}: {exc}"[-500:],
                      fix=CLUSTER_ACCESS_HINT)]
    finally:
        try:
            adapter.stop_app(probe.app_name, env=probe.environment)
        except RetoolError:
            pass  # a probe that was never deployed, or Modal gone: nothing of it runs
    return [Check(check="multi-node clusters", status="ready",
                  detail=f"Modal created the clustered functions ({sizes}) in a probe app, stopped again")]


def volume_checks(spec: Spec, adapter: ModalAdapter) -> list[Check]:
    rows: list[Check] = []
    for key in sorted(spec.volumes):
        name = modal_volume_name(spec, key)
        try:
            exists = adapter.volume_exists(name, env=spec.modal.environment)
        except RetoolError as exc:
            rows.append(Check(check=f"volume {name}", status="to fix", detail=_why(exc), fix=exc.hint))
            continue
        rows.append(Check(check=f"volume {name}", status="ready",
                          detail="exists" if exists else "not created yet: `retool apply` creates it"))
    return rows
