"""The baseline the benchmark compares against: what the seed's sandbox did.

Per request: write the code to a temporary file and run `python3 <file>` in a subprocess
(same interpreter as ours, so numpy and sympy are installed), with the request's timeout.
No isolation, no pool, no preloading - exactly the cost the fast sandbox removes.

    python bench/baseline_sandbox.py --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    language: str = "python"
    run_timeout: float = 10
    stdin: str | None = None


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/ping")
    async def ping() -> str:
        return "pong"

    @app.post("/run_code")
    async def run_code(request: Request) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, "main.py")
            with open(path, "w") as f:
                f.write(request.code)
            start = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, path, cwd=workdir, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            try:
                stdout, stderr = await asyncio.wait_for(
                    proc.communicate((request.stdin or "").encode()), request.run_timeout
                )
                timed_out = False
            except TimeoutError:
                proc.kill()
                stdout, stderr = await proc.communicate()
                timed_out = True
            elapsed = time.monotonic() - start
        code = None if timed_out else proc.returncode
        status = "Success" if code == 0 else "Failed"
        return {
            "status": status, "message": "", "compile_result": None, "executor_pod_name": None, "files": {},
            "run_result": {
                "status": "TimeLimitExceeded" if timed_out else "Finished", "execution_time": elapsed,
                "return_code": code, "stdout": stdout.decode(errors="replace"), "stderr": stderr.decode(errors="replace"),
            },
        }

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
