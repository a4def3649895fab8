"""Contract tests through real clients: verl's own SandboxFusion client and scorer, the
`sandbox-fusion` package from PyPI, and ours (sync, async, token)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import pytest

from sandbox.errors import SandboxRefusedError, SandboxUnavailableError
from sandbox.client import run_code, run_code_async, wait_ready
from sandbox.testing import LocalServer, free_port, local_server

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(workers=2, uid_base=1_650_000, work_root=str(tmp_path_factory.mktemp("work"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(
        workers=1, token=TOKEN, preload=[], uid_base=1_660_000, work_root=str(tmp_path_factory.mktemp("guarded"))
    ) as srv:
        yield srv


def test_verl_call_sandbox_api(server: LocalServer) -> None:
    from verl.utils.reward_score.sandbox_fusion.utils import call_sandbox_api

    ok, error = call_sandbox_api(server.url + "/run_code", "print(input() * 2)", "ab\n", 10, 10, 1024)
    assert error is None
    assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "abab\n"

    failed, error = call_sandbox_api(server.url + "/run_code", "raise SystemExit(4)", None, 10, 10, 1024)
    assert error is None
    assert (failed["status"], failed["run_result"]["status"], failed["run_result"]["return_code"]) == (
        "Failed", "Finished", 4,
    )

    slow, error = call_sandbox_api(server.url + "/run_code", "while True: pass", None, 1, 1, 1024)
    assert error is None
    assert (slow["status"], slow["run_result"]["status"], slow["run_result"]["return_code"]) == (
        "Failed", "TimeLimitExceeded", None,
    )


def test_verl_compute_score_grades_stdin_stdout_cases(server: LocalServer) -> None:
    from verl.utils.reward_score.sandbox_fusion import compute_score

    cases = {"inputs": ["2\n", "5\n", "-3\n"], "outputs": ["4\n", "10\n", "-6\n"]}
    right = "```python\nn = int(input())\nprint(n * 2)\n```"
    wrong = "```python\nn = int(input())\nprint(n + 1)\n```"
    score, details = compute_score(server.url + "/run_code", None, 1024, right, cases, timeout=10)
    assert score == 1.0, details
    score, _ = compute_score(server.url + "/run_code", None, 1024, wrong, cases, timeout=10)
    assert score == 0.0


def test_sandbox_fusion_package_client(server: LocalServer) -> None:
    import sandbox_fusion
    from sandbox_fusion import RunCodeRequest, RunStatus, SummaryMapping, set_endpoint
    from sandbox_fusion import run_code as sf_run_code

    set_endpoint(server.url)
    response = sf_run_code(
        RunCodeRequest(
            code="print(open('in.txt').read().upper())\nopen('out.txt', 'w').write('done')",
            language="python",
            files={"in.txt": base64.b64encode(b"hello").decode()},
            fetch_files=["out.txt"],
        ),
        max_attempts=1,
    )
    assert response.status == RunStatus.Success
    assert response.run_result.stdout == "HELLO\n"
    assert base64.b64decode(response.files["out.txt"]) == b"done"
    assert sandbox_fusion.summary_run_code_result(response, SummaryMapping()) == "Success"

    failed = sf_run_code(RunCodeRequest(code="import sys\nsys.exit(2)", language="python"), max_attempts=1)
    assert sandbox_fusion.summary_run_code_result(failed, SummaryMapping(RunFailed="RF")) == "RF"
    slow = sf_run_code(RunCodeRequest(code="import time\ntime.sleep(9)", language="python", run_timeout=0.5),
                       max_attempts=1)
    assert sandbox_fusion.summary_run_code_result(slow, SummaryMapping(RunTimeout="TLE")) == "TLE"


def test_sandbox_fusion_async_client(server: LocalServer) -> None:
    from sandbox_fusion import RunCodeRequest
    from sandbox_fusion import run_code_async as sf_run_code_async

    async def many() -> list[str]:
        requests = [RunCodeRequest(code=f"print({i} ** 2)", language="python") for i in range(8)]
        responses = await asyncio.gather(*(sf_run_code_async(r, endpoint=server.url, max_attempts=1) for r in requests))
        return [r.run_result.stdout for r in responses]

    assert asyncio.run(many()) == [f"{i ** 2}\n" for i in range(8)]


def test_our_client(server: LocalServer) -> None:
    wait_ready(server.url, timeout=10)
    response = run_code(server.url, "import sys\nprint(sys.stdin.read().strip()[::-1])", stdin="olleh", timeout=5)
    assert response.status.value == "Success" and response.run_result.stdout == "hello\n"
    assert run_code(server.url + "/run_code", "print(1)").run_result.stdout == "1\n"  # either URL form
    failed = run_code(server.url, "import time\ntime.sleep(5)", timeout=0.3)
    assert (failed.status.value, failed.run_result.status.value) == ("Failed", "TimeLimitExceeded")

    async def concurrently() -> list[str]:
        results = await asyncio.gather(*(run_code_async(server.url, f"print({i})") for i in range(6)))
        return [r.run_result.stdout for r in results]

    assert asyncio.run(concurrently()) == [f"{i}\n" for i in range(6)]


def test_our_client_with_token(guarded: LocalServer) -> None:
    assert run_code(guarded.url, "print('in')", token=TOKEN).run_result.stdout == "in\n"
    with pytest.raises(SandboxRefusedError, match="HTTP 401"):
        run_code(guarded.url, "print('in')")
    with pytest.raises(SandboxRefusedError, match="HTTP 422"):
        run_code(guarded.url + "/run_code", "print(1)", token=TOKEN, files={"../x": "eA=="})


def test_unreachable_server_is_transient() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SandboxUnavailableError):
        run_code(url, "print(1)", timeout=1)
    with pytest.raises(SandboxUnavailableError, match="not ready"):
        wait_ready(url, timeout=0.5)
