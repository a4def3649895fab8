"""The Ray backend: the spec's stages as jobs on the user's own Ray cluster, submitted
through Ray's Jobs API (docs/ray.md). Modules: `backend` (RayRuntime), `jobs` (the Jobs
API client, submission ids, job states), `job` (a stage job's entrypoint on the cluster),
`sandbox_job` (the sandbox job's entrypoint), `cluster` (nodes and free resources, for plan
and doctor), `doctor` (`retool doctor`'s rows). `ray` is imported lazily, inside functions.
"""
