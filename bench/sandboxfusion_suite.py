"""Run SandboxFusion's own python tests against our server (nothing of SandboxFusion is committed).

    python bench/sandboxfusion_suite.py /path/to/SandboxFusion   # a checkout or a bare git dir
    python bench/sandboxfusion_suite.py REPO --url http://127.0.0.1:8080   # a server already running

Their `sandbox/tests/runners/test_python.py` talks to their app through FastAPI's TestClient.
Here it runs unchanged in a temporary directory whose conftest.py stands in for their package:
`sandbox.runners` is their own `runners/types.py`, `sandbox.server.sandbox_api` holds their own
request/response models (the class definitions taken from their source), and
`sandbox.server.server.app` is an ASGI proxy that forwards every request over loopback HTTP to
our server. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEST_FILE = "sandbox/tests/runners/test_python.py"
SOURCES = {"types.py": "sandbox/runners/types.py", "sandbox_api.py": "sandbox/server/sandbox_api.py"}

CONFTEST = '''
"""Stand-in for SandboxFusion's package: their models, our server behind an ASGI proxy."""
import ast
import os
import sys
import types
from pathlib import Path

import httpx

HERE = Path(__file__).parent
URL = os.environ["SANDBOXFUSION_SUITE_URL"]


def _module(name, path=None):
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = []
    sys.modules[name] = module
    return module


_module("sandbox", path=True)
runners = _module("sandbox.runners")
exec(compile((HERE / "types.py").read_text(), "runners/types.py", "exec"), runners.__dict__)
_module("sandbox.server", path=True)
api = _module("sandbox.server.sandbox_api")
source = (HERE / "sandbox_api.py").read_text()
wanted = {"RunCodeRequest", "RunStatus", "RunCodeResponse"}
classes = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name in wanted]
prelude = "from enum import Enum\\nfrom typing import Dict, List, Optional\\nfrom pydantic import BaseModel, Field\\n"
api.__dict__.update(CommandRunResult=runners.CommandRunResult, Language=str)
exec(compile(prelude + "\\n".join(ast.unparse(c) for c in classes), "sandbox_api.py", "exec"), api.__dict__)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.lower() not in (b"host", b"content-length")]
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.request(scope["method"], URL + scope["path"], content=body, headers=headers)
    await send({
        "type": "http.response.start", "status": response.status_code,
        "headers": [(b"content-type", response.headers.get("content-type", "application/json").encode())],
    })
    await send({"type": "http.response.body", "body": response.content})


_module("sandbox.server.server").app = app
'''


def read_source(repo: Path, path: str) -> str:
    if (repo / path).is_file():
        return (repo / path).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def run_suite(repo: Path, url: str, extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="sandboxfusion-suite-") as tmp:
        work = Path(tmp)
        (work / "test_python.py").write_text(read_source(repo, TEST_FILE))
        for name, path in SOURCES.items():
            (work / name).write_text(read_source(repo, path))
        (work / "conftest.py").write_text(CONFTEST)
        env = {**os.environ, "SANDBOXFUSION_SUITE_URL": url.rstrip("/")}
        env.pop("PYTHONPATH", None)
        command = [
            sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir", tmp, "-o", "addopts=",
            str(work / "test_python.py"), *extra,
        ]
        return subprocess.run(command, cwd=tmp, env=env).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="SandboxFusion checkout or bare git directory")
    parser.add_argument("--url", help="a running server (default: start ours on loopback)")
    args, extra = parser.parse_known_args()
    if args.url:
        sys.exit(run_suite(args.repo, args.url, extra))
    from sandbox.testing import local_server

    with local_server() as server:
        code = run_suite(args.repo, server.url, extra)
    sys.exit(code)


if __name__ == "__main__":
    main()
