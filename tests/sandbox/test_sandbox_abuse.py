"""Hostile and broken programs against a real server on loopback.

Every case checks the outcome SandboxFusion's contract promises, that nothing of the program
survives it, and then that an ordinary request (the canary) still succeeds. Protections the
kernel refused on this machine (see /health "isolation") are skipped, never assumed.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.testing import LocalServer, local_server

UID_BASE = 1_610_000  # away from the default range, so a server of another test run is never touched
UID_SPAN = 256 * 4096
SECRET = f"retool-secret-{uuid.uuid4().hex}"
OUTPUT_CAP = 65536


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with local_server(
        workers=2, uid_base=UID_BASE, max_output_bytes=OUTPUT_CAP, max_file_bytes=8 * 1024 * 1024,
        work_root=str(tmp_path_factory.mktemp("sandbox-work")),
        extra_env={"RETOOL_TEST_SECRET": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET},
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def health(server: LocalServer) -> dict[str, Any]:
    return httpx.get(server.url + "/health").json()


def run(server: LocalServer, code: str, **fields: Any) -> dict[str, Any]:
    body = {"code": code, "language": "python", "run_timeout": 10, "memory_limit_MB": 1024, **fields}
    response = httpx.post(server.url + "/run_code", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def sandbox_processes() -> list[tuple[int, int]]:
    """(pid, uid) of every process running as one of the test server's execution uids."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        uid = int(uid_line.split()[1])
        if UID_BASE <= uid < UID_BASE + UID_SPAN:
            found.append((int(name), uid))
    return found


def assert_recovered(server: LocalServer, health: dict[str, Any]) -> None:
    """The canary: a normal program succeeds, and (with separate uids) nothing was left running."""
    result = run(server, "print(6 * 7)")
    assert (result["status"], result["run_result"]["stdout"]) == ("Success", "42\n"), result
    if health["isolation"]["separate_uid"]:
        deadline = time.monotonic() + 15
        while sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes() == []


def test_infinite_loop_times_out(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "while True:\n    pass", run_timeout=1)
    assert result["status"] == "Failed"
    assert result["run_result"]["status"] == "TimeLimitExceeded"
    assert result["run_result"]["return_code"] is None
    assert_recovered(server, health)


def test_long_sleep_times_out_and_keeps_earlier_output(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "import sys, time\nprint('before', flush=True)\ntime.sleep(100)", run_timeout=1)
    assert (result["status"], result["run_result"]["status"]) == ("Failed", "TimeLimitExceeded")
    assert result["run_result"]["stdout"] == "before\n"
    assert_recovered(server, health)


def test_sigterm_ignoring_spinner_is_killed(server: LocalServer, health: dict[str, Any]) -> None:
    code = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass"
    result = run(server, code, run_timeout=1)
    assert result["run_result"]["status"] == "TimeLimitExceeded"
    assert_recovered(server, health)


def test_fork_bomb_is_contained(server: LocalServer, health: dict[str, Any]) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run(server, code, run_timeout=2)
    assert result["status"] == "Failed"
    assert_recovered(server, health)


def test_daemonised_grandchild_is_killed(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["isolation"]["separate_uid"]:
        pytest.skip("needs separate uids to see the daemon")
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 10)\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('daemon started')\n"
    )
    result = run(server, code)
    assert (result["status"], result["run_result"]["stdout"]) == ("Success", "daemon started\n")
    assert_recovered(server, health)  # includes: no process of the execution uids is left


def test_child_holding_stdout_open_does_not_cause_a_timeout(server: LocalServer, health: dict[str, Any]) -> None:
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nprint('parent done')"
    result = run(server, code, run_timeout=20)
    assert result["status"] == "Success"
    assert result["run_result"]["status"] == "Finished"
    assert result["run_result"]["stdout"] == "parent done\n"
    assert_recovered(server, health)


def test_memory_bomb_fails_with_memory_error(server: LocalServer, health: dict[str, Any]) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))"
    result = run(server, code, memory_limit_MB=512)
    assert (result["status"], result["run_result"]["status"]) == ("Failed", "Finished")
    assert "MemoryError" in result["run_result"]["stderr"]
    assert_recovered(server, health)


def test_numpy_with_threads_runs_under_1024_mb(server: LocalServer, health: dict[str, Any]) -> None:
    code = (
        "import numpy as np\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def work(seed):\n"
        "    a = np.random.default_rng(seed).random((300, 300))\n"
        "    return float(np.linalg.norm(a @ a.T))\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    print(len([x for x in pool.map(work, range(16)) if x > 0]))\n"
    )
    result = run(server, code, memory_limit_MB=1024)
    assert result["status"] == "Success", result
    assert result["run_result"]["stdout"] == "16\n"
    assert_recovered(server, health)


def test_one_gigabyte_of_output_is_capped_and_finishes(server: LocalServer, health: dict[str, Any]) -> None:
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\nprint('end', file=sys.stderr)"
    result = run(server, code, run_timeout=60)
    assert (result["status"], result["run_result"]["status"]) == ("Success", "Finished")
    stdout = result["run_result"]["stdout"]
    assert stdout.startswith("x" * OUTPUT_CAP)
    assert f"{(1 << 30) - OUTPUT_CAP} more bytes not shown" in stdout
    assert result["run_result"]["stderr"] == "end\n"
    assert_recovered(server, health)


def test_200_kb_of_output_finishes(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "print('y' * 200_000)")
    assert (result["status"], result["run_result"]["status"]) == ("Success", "Finished")
    assert result["run_result"]["stdout"].startswith("y" * OUTPUT_CAP + "\n[sandbox: output truncated")
    assert_recovered(server, health)


def test_binary_output_never_breaks_the_json(server: LocalServer, health: dict[str, Any]) -> None:
    code = "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 4)\nsys.stderr.buffer.write(b'\\xff\\xfe\\x00\\xc3')"
    result = run(server, code)
    assert result["status"] == "Success"
    assert "\ufffd" in result["run_result"]["stdout"]
    assert result["run_result"]["stderr"] == "\ufffd\ufffd\x00\ufffd"
    assert_recovered(server, health)


def test_server_secrets_are_not_readable(server: LocalServer, health: dict[str, Any]) -> None:
    code = (
        "import os\n"
        "print(sorted(os.environ.items()))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['1', '%d']:\n"
        "    for part in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(pid, part, open(f'/proc/{pid}/{part}', 'rb').read())\n"
        "        except OSError as exc:\n"
        "            print(pid, part, type(exc).__name__)\n" % server.pid
    )
    result = run(server, code)
    assert result["status"] == "Success", result
    output = result["run_result"]["stdout"] + result["run_result"]["stderr"]
    assert SECRET not in output
    assert "RETOOL_TEST_SECRET" not in output and "AWS_SECRET_ACCESS_KEY" not in output
    if health["isolation"]["proc_hidden"]:
        assert f"{server.pid} cmdline b'" not in output  # the server is not even visible
    assert_recovered(server, health)


@pytest.mark.parametrize(
    "fields",
    [
        {"files": {"../evil.txt": base64.b64encode(b"x").decode()}},
        {"files": {"/tmp/../etc/evil.txt": base64.b64encode(b"x").decode()}},
        {"files": {"a/../../evil.txt": base64.b64encode(b"x").decode()}},
        {"files": {"/proc/self/evil.txt": base64.b64encode(b"x").decode()}},
        {"files": {"/dev/evil": base64.b64encode(b"x").decode()}},
        {"fetch_files": ["../../etc/passwd"]},
        {"fetch_files": ["/etc/../etc/passwd"]},
        {"fetch_files": ["/proc/1/environ"]},
    ],
)
def test_path_escapes_in_the_request_are_refused(server: LocalServer, health: dict[str, Any], fields: dict[str, Any]) -> None:
    response = httpx.post(server.url + "/run_code", json={"code": "print(1)", "language": "python", **fields})
    assert response.status_code == 422, response.text
    assert_recovered(server, health)


def test_symlinks_and_hard_links_never_leak_files(server: LocalServer, health: dict[str, Any]) -> None:
    code = (
        "import os\n"
        "os.symlink('/etc/passwd', 'link')\n"
        "os.symlink('/etc', 'etcdir')\n"
        "try:\n"
        "    os.link('/etc/passwd', 'hard')\n"
        "except OSError as exc:\n"
        "    print('link refused', exc.errno)\n"
        "open('own.txt', 'w').write('mine')\n"
    )
    result = run(server, code, fetch_files=["link", "etcdir/passwd", "hard", "own.txt"])
    assert result["status"] == "Success", result
    assert result["files"] == {"own.txt": base64.b64encode(b"mine").decode()}
    assert_recovered(server, health)


def test_writing_outside_the_workdir_is_refused(server: LocalServer, health: dict[str, Any], tmp_path) -> None:
    if not health["isolation"]["separate_uid"]:
        pytest.skip("runs as the server's own user here")
    marker = f"retool-escape-{uuid.uuid4().hex}"
    targets = ["/etc", "/root", "/usr/lib", "/var", str(tmp_path), os.getcwd()]
    code = (
        "import json\n"
        "results = {}\n"
        f"for d in {targets!r}:\n"
        "    try:\n"
        f"        open(d + '/{marker}', 'w').write('x')\n"
        "        results[d] = 'written'\n"
        "    except OSError as exc:\n"
        "        results[d] = type(exc).__name__\n"
        f"open('/tmp/{marker}', 'w').write('inside')\n"
        "print(json.dumps(results))\n"
    )
    result = run(server, code)
    assert result["status"] == "Success", result
    outcome = json.loads(result["run_result"]["stdout"])
    assert all(value != "written" for value in outcome.values()), outcome
    for directory in targets:
        assert not os.path.exists(os.path.join(directory, marker))
    if health["isolation"]["private_tmp"]:
        assert not os.path.exists(f"/tmp/{marker}")
    assert_recovered(server, health)


def test_no_leak_between_requests_through_tmp(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["isolation"]["private_tmp"]:
        pytest.skip("no private /tmp on this machine")
    name = f"leak-{uuid.uuid4().hex}"
    write = f"for d in ('/tmp', '/var/tmp', '/dev/shm', '.'):\n    open(f'{{d}}/{name}', 'w').write('secret')\nprint('ok')"
    check = f"import os\nprint([d for d in ('/tmp', '/var/tmp', '/dev/shm', '.') if os.path.exists(f'{{d}}/{name}')])"
    assert run(server, write)["run_result"]["stdout"] == "ok\n"
    for _ in range(4):  # every slot gets a turn
        assert run(server, check)["run_result"]["stdout"] == "[]\n"
    assert not os.path.exists(f"/tmp/{name}")
    assert_recovered(server, health)


def test_no_network_not_even_loopback(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["network_isolated"]:
        pytest.skip("the kernel refused a network namespace here")
    code = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {server.port}), ('8.8.8.8', 53), ('1.1.1.1', 443)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2).close()\n"
        "        print(host, 'connected')\n"
        "    except OSError as exc:\n"
        "        print(host, 'blocked')\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443)\n"
        "    print('dns resolved')\n"
        "except OSError:\n"
        "    print('dns blocked')\n"
    )
    result = run(server, code)
    assert result["run_result"]["stdout"] == "127.0.0.1 blocked\n8.8.8.8 blocked\n1.1.1.1 blocked\ndns blocked\n"
    assert_recovered(server, health)


def test_killing_the_parent_and_everyone_else_fails(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["isolation"]["separate_uid"]:
        pytest.skip("runs as the server's own user here")
    code = (
        "import os, signal\n"
        "try:\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n"
        "except PermissionError:\n"
        "    print('parent protected')\n"
        f"for pid in (1, {server.pid}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except (PermissionError, ProcessLookupError):\n"
        "        print('protected')\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    signal.pause()\n"
        "os.kill(-1, signal.SIGKILL)  # everything this uid may signal (Linux spares the caller)\n"
        "print('child', os.waitpid(child, 0)[1])\n"
    )
    result = run(server, code)
    assert result["run_result"]["stdout"] == "parent protected\nprotected\nprotected\nchild 9\n"
    assert result["status"] == "Success"
    assert_recovered(server, health)


def test_segfault_reports_signal_11(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "import ctypes\nctypes.string_at(0)")
    assert (result["status"], result["run_result"]["status"], result["run_result"]["return_code"]) == (
        "Failed", "Finished", -11,
    )
    assert_recovered(server, health)


def test_sys_exit_code_is_reported(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "import sys\nprint('bye')\nsys.exit(3)")
    assert (result["status"], result["run_result"]["status"], result["run_result"]["return_code"]) == (
        "Failed", "Finished", 3,
    )
    assert result["run_result"]["stdout"] == "bye\n"
    assert_recovered(server, health)


def test_input_without_stdin_ends_at_once(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "x = input()\nprint('got', x)", run_timeout=20)
    assert (result["status"], result["run_result"]["status"], result["run_result"]["return_code"]) == (
        "Failed", "Finished", 1,
    )
    assert "EOFError" in result["run_result"]["stderr"]
    assert_recovered(server, health)


def test_writing_a_file_over_the_size_limit_fails(server: LocalServer, health: dict[str, Any]) -> None:
    code = "f = open('big.bin', 'wb')\nf.write(b'0' * (9 * 1024 * 1024))\nf.close()"
    result = run(server, code)
    assert result["status"] == "Failed"
    assert "File too large" in result["run_result"]["stderr"]
    assert_recovered(server, health)


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"run_timeout": -1}, 422),
        ({"run_timeout": 0}, 422),
        ({"compile_timeout": -5}, 422),
        ({"run_timeout": "soon"}, 422),
    ],
)
def test_bad_timeouts_are_refused(server: LocalServer, health: dict[str, Any], fields: dict[str, Any], status: int) -> None:
    response = httpx.post(server.url + "/run_code", json={"code": "print(1)", "language": "python", **fields})
    assert response.status_code == status, response.text
    assert_recovered(server, health)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_timeouts_are_refused(server: LocalServer, health: dict[str, Any], literal: str) -> None:
    body = '{"code": "print(1)", "language": "python", "run_timeout": %s}' % literal
    response = httpx.post(server.url + "/run_code", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert_recovered(server, health)


def test_huge_timeout_and_memory_are_clamped(server: LocalServer, health: dict[str, Any]) -> None:
    result = run(server, "print('fine')", run_timeout=1e12, memory_limit_MB=10**9)
    assert (result["status"], result["run_result"]["stdout"]) == ("Success", "fine\n")
    assert_recovered(server, health)


def test_ten_megabytes_of_code_is_refused(server: LocalServer, health: dict[str, Any]) -> None:
    code = "x = 1\n" * (10 * 1024 * 1024 // 6 + 1)
    response = httpx.post(server.url + "/run_code", json={"code": code, "language": "python"}, timeout=60)
    assert response.status_code == 413, response.text[:300]
    assert "limit" in response.json()["detail"]
    assert_recovered(server, health)


def test_killed_forker_is_a_sandbox_error_and_the_slot_recovers(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["isolation"]["separate_uid"]:
        pytest.skip("finds the execution by its uid")
    import threading

    box: dict[str, Any] = {}
    code = "import time\nopen('left-behind.txt', 'w').write('x')\ntime.sleep(30)"
    thread = threading.Thread(target=lambda: box.update(run(server, code, run_timeout=30)))
    thread.start()
    deadline = time.monotonic() + 20
    while not sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    (pid, _), *_ = sandbox_processes()
    with open(f"/proc/{pid}/stat") as f:
        forker = int(f.read().rsplit(")", 1)[1].split()[1])  # the program process's parent
    os.kill(forker, 9)
    thread.join(60)
    assert box["status"] == "SandboxError"
    # Occupy every slot at once, so one of these runs in the slot that failed: it must be empty.
    listing = "import os, time\ntime.sleep(0.5)\nprint(os.listdir('.'))"
    with concurrent.futures.ThreadPoolExecutor(health["pool_size"]) as pool:
        results = list(pool.map(lambda _: run(server, listing), range(health["pool_size"])))
    assert [r["run_result"]["stdout"] for r in results] == ["['main.py']\n"] * health["pool_size"]  # only its own code
    assert_recovered(server, health)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_absolute_paths_live_in_a_private_view_of_the_whole_filesystem(
    server: LocalServer, health: dict[str, Any]
) -> None:
    if not health["isolation"]["private_root"]:
        response = httpx.post(server.url + "/run_code", json={"code": "1", "language": "python", "fetch_files": ["/mnt/b"]})
        assert response.status_code == 422 and "private filesystem view" in response.text
        pytest.skip("no private filesystem view here (overlayfs refused): absolute paths are refused instead")
    name = f"view-{uuid.uuid4().hex}"
    host_marker = f"/tmp/{name}-host"
    with open(host_marker, "w") as f:  # the host's /tmp must not show through
        f.write("host")
    try:
        paths = [f"/mnt/{name}", f"/opt/{name}/deep/file", f"/var/tmp/{name}", f"/dev/shm/{name}-shm", f"{name}-rel"]
        code = (
            "import os, json\n"
            f"for p in {paths!r}:\n"
            "    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n"
            "    open(p, 'w').write('from ' + p)\n"
            f"print(json.dumps([os.path.exists({host_marker!r}), open('/srv/{name}.in').read(), open('in/{name}').read()]))\n"
        )
        files = {f"/srv/{name}.in": b64(b"absolute input"), f"in/{name}": b64(b"relative input")}
        result = run(server, code, files=files, fetch_files=[*paths, "/etc/passwd", f"/tmp/{name}-rel"])
        assert result["status"] == "Success", result
        assert json.loads(result["run_result"]["stdout"]) == [False, "absolute input", "relative input"]
        expected = {p: b64(f"from {p}".encode()) for p in paths}
        expected[f"/tmp/{name}-rel"] = expected[f"{name}-rel"]  # the working directory is /tmp
        assert result["files"] == expected  # /etc/passwd: not written by the program, not returned
        for path in [f"/mnt/{name}", f"/opt/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}-shm", f"/srv/{name}.in"]:
            assert not os.path.exists(path), path  # nothing outside the slot changed
        seen = f"import os\nprint([p for p in {[*paths, f'/srv/{name}.in']!r} if os.path.exists(p)])"
        for _ in range(4):  # every slot gets a turn: each run starts from an empty upper layer
            assert run(server, seen)["run_result"]["stdout"] == "[]\n"
    finally:
        os.unlink(host_marker)
    assert_recovered(server, health)


def test_no_escape_from_the_view_through_symlinks(server: LocalServer, health: dict[str, Any]) -> None:
    if not health["isolation"]["private_root"]:
        pytest.skip("no private filesystem view here")
    code = "import os\nos.symlink('/etc', '/tmp/etc')\nos.symlink('/etc/hostname', '/mnt/host')\nprint('ok')"
    result = run(server, code, fetch_files=["/tmp/etc/hostname", "/mnt/host", "etc/hostname"])
    assert (result["status"], result["files"]) == ("Success", {})  # symlinks are never followed
    # /lib is a symlink on merged-/usr systems: a request file through it is refused, not followed.
    if os.path.islink("/lib"):
        target = f"/lib/retool-{uuid.uuid4().hex}"
        refused = run(server, "print(1)", files={target: b64(b"x")})
        assert refused["status"] == "SandboxError" and "could not write" in refused["message"], refused
        assert not os.path.exists(target)
    assert_recovered(server, health)


def test_without_the_view_the_slot_namespace_still_gives_a_private_tmp(tmp_path) -> None:
    """The fallback where overlays are refused (forced here with filesystem_view=false)."""
    with local_server(
        workers=1, preload=[], filesystem_view=False, uid_base=UID_BASE + 256 * 8, work_root=str(tmp_path)
    ) as fallback:
        isolation = httpx.get(fallback.url + "/health").json()["isolation"]
        assert not isolation["private_root"] and any("filesystem_view=false" in n for n in isolation["notes"])
        refused = httpx.post(fallback.url + "/run_code", json={"code": "1", "language": "python", "files": {"/mnt/b": "eA=="}})
        assert refused.status_code == 422 and "private filesystem view" in refused.text
        name = f"fallback-{uuid.uuid4().hex}"
        code = f"import os\nprint(open('in/{name}').read(), os.getcwd())\nopen('/var/tmp/{name}', 'w').write('out')"
        result = run(fallback, code, files={f"in/{name}": b64(b"input")}, fetch_files=[name])
        assert result["status"] == "Success", result
        cwd = "/tmp" if isolation["private_tmp"] else None
        assert result["run_result"]["stdout"].split()[0] == "input"
        if cwd:
            assert result["run_result"]["stdout"].split()[1] == cwd
            assert result["files"] == {name: b64(b"out")}  # /var/tmp is the workdir too
            assert not os.path.exists(f"/var/tmp/{name}")
        again = run(fallback, f"import os\nprint(os.path.exists('in/{name}'))")
        assert again["run_result"]["stdout"] == "False\n"  # emptied between runs
