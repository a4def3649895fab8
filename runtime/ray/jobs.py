"""Ray's Jobs API as the Ray backend uses it: the client, submission ids, a node's jobs.

A job's `submission_id` is derived from what it runs and the attempt:
`retool-<spec>-<node>-<identity[:12]>-<attempt>`. Ray refuses a second job with an id it
already has, so two launches that race (an apply that crashed after submitting, then the
next apply) cannot start two jobs: the second finds the first by its id prefix and
attaches to it while it runs. A finished attempt (failed, stopped, succeeded) is never
reused; the next attempt counts up. Every job also carries `metadata` naming the spec, the
node and the identity, so `ray job list` tells retool's jobs apart.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

from reconciler.errors import TerminalError, TransientError
from reconciler.spec import Spec

if TYPE_CHECKING:  # ray is imported only when the backend talks to the cluster
    from ray.job_submission import JobDetails, JobSubmissionClient

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_ENV = "RAY_ADDRESS"


def address_of(spec: Spec) -> str:
    """The Jobs API address: `ray.address`, else RAY_ADDRESS (as `ray job submit` reads it)."""
    address = spec.ray.address or os.environ.get(ADDRESS_ENV, "")
    if not address:
        raise TerminalError(
            "The Ray backend needs the cluster's address",
            "neither `ray.address` in the spec nor RAY_ADDRESS in the environment is set",
            "set `ray: {address: http://<head>:8265}` (the dashboard's address)",
        )
    return address if "://" in address else f"http://{address}"


def quiet_ray_sdk() -> None:
    """Ray's SDK logs every package upload at INFO on the console; apply has its own output."""
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(spec: Spec) -> JobSubmissionClient:
    """A Jobs API client of the spec's cluster (raises TransientError when it does not answer)."""
    return client_at(address_of(spec))


def client_at(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    quiet_ray_sdk()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TransientError(f"the Ray cluster at {address} does not answer", str(e).splitlines()[0]) from e


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-")


def prefix(spec_name: str, node: str, identity: str) -> str:
    return f"retool-{slug(spec_name)}-{slug(node)}-{identity[:12]}-"


def status_name(job: JobDetails) -> str:
    status = job.status
    return str(getattr(status, "value", status))


def jobs_of(jobs: list[JobDetails], spec_name: str, node: str, identity: str) -> list[JobDetails]:
    """The attempts of one node's identity, oldest first."""
    head = prefix(spec_name, node, identity)
    mine = [j for j in jobs if (j.submission_id or "").startswith(head)]
    return sorted(mine, key=lambda j: attempt_of(j.submission_id or "", head))


def attempt_of(submission_id: str, head: str) -> int:
    tail = submission_id[len(head):]
    return int(tail) if tail.isdigit() else 0


def next_submission_id(spec_name: str, node: str, identity: str, attempts: list[JobDetails]) -> str:
    head = prefix(spec_name, node, identity)
    last = max((attempt_of(j.submission_id or "", head) for j in attempts), default=0)
    return f"{head}{last + 1}"


def list_jobs(jobs_client: JobSubmissionClient) -> list[JobDetails]:
    try:
        return list(jobs_client.list_jobs())
    except (ConnectionError, RuntimeError) as e:
        raise TransientError("cannot list the Ray cluster's jobs", str(e).splitlines()[0]) from e


def job_info(jobs_client: JobSubmissionClient, submission_id: str) -> JobDetails | None:
    """The job, or None when the cluster does not know it (a restarted head forgets jobs)."""
    try:
        return jobs_client.get_job_info(submission_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise TransientError(f"cannot read Ray job {submission_id}", str(e).splitlines()[0]) from e
    except ConnectionError as e:
        raise TransientError(f"cannot read Ray job {submission_id}", str(e).splitlines()[0]) from e


AGENT_WAIT_S = 120.0  # a node's job agent answers a while after the node is alive


def submit(jobs_client: JobSubmissionClient, submission_id: str, **kwargs: Any) -> bool:
    """Submit; False when a job with this id exists already (a racing launch submitted it).
    A cluster whose job agent is not up yet ("try again later") is asked again for a while."""
    import time

    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            jobs_client.submit_job(submission_id=submission_id, **kwargs)
            return True
        except RuntimeError as e:
            if "already exists" in str(e):
                return False
            if "try again later" in str(e) and time.time() < deadline:
                time.sleep(2.0)
                continue
            raise TerminalError(f"Ray refused job {submission_id}", str(e).splitlines()[0]) from e
        except ConnectionError as e:
            raise TransientError(f"cannot submit Ray job {submission_id}", str(e).splitlines()[0]) from e


def stop(jobs_client: JobSubmissionClient, submission_id: str, *, wait_s: float = 120.0) -> None:
    """Stop a job (SIGTERM to its entrypoint's process group, then SIGKILL) and wait for its end."""
    import time

    try:
        jobs_client.stop_job(submission_id)
    except RuntimeError:
        return  # unknown or already finished
    deadline = time.time() + wait_s
    while time.time() < deadline:
        job = job_info(jobs_client, submission_id)
        if job is None or status_name(job) in TERMINAL:
            return
        time.sleep(0.5)
    raise TransientError(f"Ray job {submission_id} did not stop within {wait_s:.0f} s")


def ray_runtime_env(spec: Spec, env_vars: dict[str, str]) -> dict[str, Any]:
    """How the code and environment reach the cluster: retool's packages as `py_modules`
    (unless the nodes' image has retool installed), the spec's `pip` and env vars."""
    env: dict[str, Any] = {"env_vars": {**spec.ray.env, **env_vars}}
    if spec.ray.ship_code:
        import reconciler
        import runtime
        import sandbox

        env["py_modules"] = [os.path.dirname(m.__file__ or "") for m in (reconciler, runtime, sandbox)]
        env["excludes"] = ["__pycache__", "*.pyc"]
    if spec.ray.pip:
        env["pip"] = list(spec.ray.pip)
    return env
