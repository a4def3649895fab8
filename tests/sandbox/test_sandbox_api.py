"""The HTTP API of a real server on loopback: the SandboxFusion contract, files, stdin, Python
semantics of a forked execution, health and metrics, the token, backpressure, zygote restart."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.testing import LocalServer, local_server

TOKEN = "test-token-" + "x" * 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(workers=2, uid_base=1_630_000, work_root=str(tmp_path_factory.mktemp("work"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One worker, a queue of one, a token, small request bodies."""
    with local_server(
        workers=1, max_queue=1, token=TOKEN, max_request_bytes=1024 * 1024, uid_base=1_640_000,
        preload=["json"], work_root=str(tmp_path_factory.mktemp("strict")),
    ) as srv:
        yield srv


def post(server: LocalServer, body: dict[str, Any], token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers["content-type"] = "application/json"
    content = json.dumps(body)  # ASCII-escaped, so lone surrogates can be sent as \udXXX escapes
    return httpx.post(server.url + "/run_code", content=content, headers=headers, timeout=60)


def run(server: LocalServer, code: str, **fields: Any) -> dict[str, Any]:
    response = post(server, {"code": code, "language": "python", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_ping(server: LocalServer) -> None:
    response = httpx.get(server.url + "/v1/ping")
    assert (response.status_code, response.json()) == (200, "pong")


def test_response_has_exactly_sandboxfusions_shape(server: LocalServer) -> None:
    result = run(server, "print('hello')")
    assert set(result) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    assert set(result["run_result"]) == {"status", "execution_time", "return_code", "stdout", "stderr"}
    assert (result["status"], result["message"], result["compile_result"]) == ("Success", "", None)
    assert result["run_result"]["stdout"] == "hello\n"
    assert result["run_result"]["execution_time"] > 0


def test_stdout_stderr_and_traceback_look_like_python(server: LocalServer) -> None:
    result = run(server, "import sys\nprint('out')\nprint('err', file=sys.stderr)\nvalue = 1\nvalue / 0\n")
    assert result["status"] == "Failed"
    assert result["run_result"]["return_code"] == 1
    assert result["run_result"]["stdout"] == "out\n"
    stderr = result["run_result"]["stderr"]
    assert stderr.startswith("err\nTraceback (most recent call last):\n")
    assert 'line 5, in <module>\n    value / 0' in stderr  # the source line is shown
    assert "sandbox" not in stderr  # no frames of the runner
    assert stderr.endswith("ZeroDivisionError: division by zero\n")


def test_syntax_error_is_reported_like_python(server: LocalServer) -> None:
    result = run(server, "x = = 1")
    assert result["run_result"]["return_code"] == 1
    assert "SyntaxError" in result["run_result"]["stderr"]
    assert "Traceback" not in result["run_result"]["stderr"]


def test_script_semantics(server: LocalServer) -> None:
    code = (
        "import sys, os, threading, atexit\n"
        "class Point:\n"
        "    pass\n"
        "import pickle\n"
        "print(__name__, Point.__module__, len(pickle.dumps(Point())) > 0)\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "f = open('unclosed.txt', 'w'); f.write('flushed at exit')\n"
        "go = threading.Event()\n"
        "threading.Thread(target=lambda: (go.wait(), print('thread joined'))).start()\n"
        "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
        "go.set()  # the thread prints after the program's last line: exit waits for it\n"
    )
    result = run(server, code, fetch_files=["unclosed.txt"])
    assert result["run_result"]["stdout"].splitlines() == [
        "__main__ __main__ True", "True", "thread joined", "atexit ran",
    ], result
    assert base64.b64decode(result["files"]["unclosed.txt"]) == b"flushed at exit"


def test_each_execution_gets_fresh_randomness(server: LocalServer) -> None:
    code = "import random, numpy\nprint(random.random(), numpy.random.rand())"
    outputs = {run(server, code)["run_result"]["stdout"] for _ in range(4)}
    assert len(outputs) == 4


def test_preloaded_libraries_work(server: LocalServer) -> None:
    code = "import sympy, numpy as np\nx = sympy.symbols('x')\nprint(sympy.factor(x**2 - 1), int(np.arange(5).sum()))"
    assert run(server, code)["run_result"]["stdout"] == "(x - 1)*(x + 1) 10\n"


def test_stdin_is_delivered(server: LocalServer) -> None:
    code = "import sys\nprint(sum(int(line) for line in sys.stdin))"
    big = "".join(f"{i}\n" for i in range(50_000))  # larger than a pipe buffer
    assert run(server, code, stdin=big)["run_result"]["stdout"] == f"{sum(range(50_000))}\n"
    assert run(server, "print(input()[::-1])", stdin="abc\n")["run_result"]["stdout"] == "cba\n"


def test_files_in_and_out(server: LocalServer) -> None:
    files = {
        "data/input.txt": base64.b64encode(b"21").decode(),
        "helper.py": base64.b64encode(b"def double(x):\n    return 2 * x\n").decode(),
        "ignored.txt": None,
    }
    code = (
        "import helper, os\n"
        "value = helper.double(int(open('data/input.txt').read()))\n"
        "os.makedirs('out', exist_ok=True)\n"
        "open('out/result.txt', 'w').write(str(value))\n"
        "print(sorted(os.listdir('.')))\n"
    )
    result = run(server, code, files=files, fetch_files=["out/result.txt", "missing.txt"])
    assert result["status"] == "Success", result
    assert result["run_result"]["stdout"] == "['data', 'helper.py', 'main.py', 'out']\n"
    assert result["files"] == {"out/result.txt": base64.b64encode(b"42").decode()}
    again = run(server, "import os\nprint(os.listdir('.'))")
    assert again["run_result"]["stdout"] == "['main.py']\n"  # nothing carried over: only its own code


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"code": "print(1)", "language": "cpp"}, 400),
        ({"code": "print(1)", "language": "klingon"}, 400),
        ({"language": "python"}, 422),
        ({"code": "print(1)"}, 422),
        ({"code": "print(1)", "language": "python", "files": {"a": "not base64!"}}, 422),
        ({"code": "print(1)", "language": "python", "files": {"a": "eA==", "a/b": "eA=="}}, 422),
        ({"code": "print(1)", "language": "python", "stdin": 5}, 422),
        ({"code": "print('\ud800')", "language": "python"}, 422),  # a lone surrogate is not text
        ({"code": "print(1)", "language": "python", "stdin": "\udc80"}, 422),
        ({"code": "print(1)", "language": "python", "files": {"a\udc80": "eA=="}}, 422),
    ],
)
def test_bad_requests_get_clear_4xx(server: LocalServer, body: dict[str, Any], status: int) -> None:
    response = post(server, body)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_malformed_json_is_422(server: LocalServer) -> None:
    response = httpx.post(server.url + "/run_code", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_unknown_fields_are_ignored_like_sandboxfusion(server: LocalServer) -> None:
    assert run(server, "print(2)", args=["-q"], extra={"x": 1})["run_result"]["stdout"] == "2\n"


def test_health_and_metrics(server: LocalServer) -> None:
    run(server, "print(1)")
    run(server, "import time\ntime.sleep(5)", run_timeout=0.2)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    assert health["pool_size"] == 2
    assert health["executions"] >= 2 and health["timeouts"] >= 1
    assert {"busy", "queue_depth", "errors", "rejected", "network_isolated", "isolation", "preloaded"} <= set(health)
    assert health["preloaded"] == ["numpy", "sympy"]
    metrics = httpx.get(server.url + "/metrics").text
    assert "retool_sandbox_executions_total" in metrics and "retool_sandbox_queue_depth" in metrics


def test_token_is_required_except_for_ping(strict: LocalServer) -> None:
    body = {"code": "print(1)", "language": "python"}
    assert post(strict, body).status_code == 401
    assert post(strict, body, token="wrong").status_code == 401
    assert httpx.get(strict.url + "/health").status_code == 401
    assert httpx.get(strict.url + "/v1/ping").json() == "pong"
    response = post(strict, body, token=TOKEN)
    assert response.status_code == 200 and response.json()["status"] == "Success"


def test_oversized_body_is_413(strict: LocalServer) -> None:
    body = {"code": "print(1)", "language": "python", "stdin": "x" * (2 * 1024 * 1024)}
    assert post(strict, body, token=TOKEN).status_code == 413


def test_full_queue_answers_503_with_retry_after(strict: LocalServer) -> None:
    body = {"code": "import time\ntime.sleep(1.5)\nprint('slept')", "language": "python", "run_timeout": 10}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post(strict, body, token=TOKEN), range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes, codes  # one running, one waiting, the rest refused
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert all(r.json()["run_result"]["stdout"] == "slept\n" for r in responses if r.status_code == 200)
    health = httpx.get(strict.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert health["rejected"] >= 1


def test_zygote_death_is_survived(server: LocalServer) -> None:
    before = httpx.get(server.url + "/health").json()
    os.kill(before["zygote_pid"], signal.SIGKILL)
    results = [run(server, "print('after')") for _ in range(6)]  # prepared workers, then fresh ones
    assert all(r["run_result"]["stdout"] == "after\n" for r in results), results
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = httpx.get(server.url + "/health").json()
        if after["zygote_restarts"] >= 1:
            break
        time.sleep(0.1)
    assert after["zygote_restarts"] >= 1 and after["zygote_pid"] != before["zygote_pid"]


def test_concurrent_requests_all_answered(server: LocalServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: run(server, f"print({n} * 3)"), range(64)))
    assert [r["run_result"]["stdout"] for r in results] == [f"{n * 3}\n" for n in range(64)]


def test_an_idle_connection_outlives_the_clients_keep_alive(server: LocalServer) -> None:
    """httpx drops idle connections after 5 s; the server must keep them longer, or a client can
    reuse one at the moment the server closes it and lose that request (seen in the soak test)."""
    import socket
    import time

    request = b"GET /v1/ping HTTP/1.1\r\nHost: sandbox\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b'"pong"'):
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the connection after {pause} s idle: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
