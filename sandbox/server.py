"""Serve the sandbox with uvicorn: `retool sandbox serve --host H --port P` calls `serve`.

Also runnable as `python -m sandbox.server --host 127.0.0.1 --port 8080` (used by the
benchmark and the tests). Settings not given here come from `RETOOL_SANDBOX_*` variables;
pass the token through `RETOOL_SANDBOX_TOKEN` rather than the command line, where any local
user could read it in the process list.
"""

from __future__ import annotations

import argparse

from sandbox.settings import SandboxSettings

KEEP_ALIVE_S = 75  # seconds an idle HTTP connection stays open (uvicorn's default is 5)


def serve(
    host: str,
    port: int,
    *,
    workers: int | None = None,
    processes: int | None = None,
    max_queue: int = 256,
    queue_timeout_s: float | None = None,
    preload: list[str] | None = None,
    memory_limit_mb: int = 1024,
    max_output_bytes: int = 65536,
    token: str | None = None,
) -> None:
    """Run the server until interrupted (blocking).

    Arguments win over `RETOOL_SANDBOX_*` variables, except those left at their defaults, so
    `RETOOL_SANDBOX_MAX_QUEUE=64 retool sandbox serve ...` still works.
    """
    import uvicorn

    from sandbox.app import create_app

    given = {
        "workers": workers, "processes": processes, "queue_timeout_s": queue_timeout_s, "max_queue": max_queue,
        "preload": preload, "memory_limit_mb": memory_limit_mb, "max_output_bytes": max_output_bytes, "token": token,
    }
    defaults = SandboxSettings.model_construct()
    overrides = {k: v for k, v in given.items() if v is not None and v != getattr(defaults, k, None)}
    settings = SandboxSettings.from_env(None, **overrides)
    if settings.process_count() > 1:  # several event loops share the port (sandbox.supervisor)
        from sandbox.supervisor import supervise

        supervise(settings, host, port)
        return
    # Keep idle connections longer than clients do (httpx: 5 s): with equal timeouts a client may
    # reuse a connection at the moment the server closes it, and that request is lost.
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level="warning", access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--processes", type=int, default=None, help="server processes (default one per 8 workers)")
    parser.add_argument("--queue-timeout-s", type=float, default=None, help="default bound on a request's wait for a worker")
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument("--preload", default=None, help="comma-separated modules (default numpy,sympy)")
    parser.add_argument("--memory-limit-mb", type=int, default=None)
    parser.add_argument("--max-output-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    options = {
        "workers": args.workers, "processes": args.processes, "queue_timeout_s": args.queue_timeout_s,
        "max_queue": args.max_queue, "memory_limit_mb": args.memory_limit_mb,
        "max_output_bytes": args.max_output_bytes,
        "preload": None if args.preload is None else [m for m in args.preload.split(",") if m],
    }
    serve(args.host, args.port, **{k: v for k, v in options.items() if v is not None})


if __name__ == "__main__":
    main()
