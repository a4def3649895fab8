"""Sandbox building blocks on their own: path rules, output capping, settings, the slot pool,
status mapping. (Everything that needs processes and a server is in the other test_sandbox_* files.)"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from sandbox.errors import SandboxSettingsError
from sandbox.app import to_response
from sandbox.output import CappedOutput
from sandbox.paths import (
    UnsafePathError,
    check_file_layout,
    check_relative_path,
    read_file,
    write_file,
)
from sandbox.pool import QueueFullError, SlotPool
from sandbox.protocol import ExecutionOutcome, SlotSpec
from sandbox.settings import SandboxSettings
from sandbox.workspace import remove_stale_workspaces


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\x00b", ".", "./"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(path)


def test_plain_relative_paths_are_split() -> None:
    assert check_relative_path("a/b/c.txt") == ("a", "b", "c.txt")
    assert check_relative_path("./a//b") == ("a", "b")


def test_a_file_that_is_also_a_directory_is_refused() -> None:
    check_file_layout(["a/b", "a/c", "d"])
    with pytest.raises(UnsafePathError, match="both a file and a directory"):
        check_file_layout(["a", "a/b"])


def test_read_file_never_follows_symlinks(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    work = tmp_path / "work"
    work.mkdir()
    (work / "link").symlink_to(secret)
    (work / "dirlink").symlink_to(tmp_path)
    os.mkfifo(work / "fifo")
    root_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def parts(path: str) -> tuple[str, ...]:
            return tuple(path.split("/"))

        write_file(root_fd, parts("sub/dir/ok.txt"), b"fine", owner=None)
        me = {os.getuid()}
        assert read_file(root_fd, parts("sub/dir/ok.txt"), 100, me) == b"fine"
        assert read_file(root_fd, parts("link"), 100, me) is None
        assert read_file(root_fd, parts("dirlink/secret.txt"), 100, me) is None
        assert read_file(root_fd, parts("fifo"), 100, me) is None  # and does not block
        assert read_file(root_fd, parts("missing"), 100, me) is None
        assert read_file(root_fd, parts("sub/dir/ok.txt"), 3, me) is None  # over the size limit
        assert read_file(root_fd, parts("sub/dir/ok.txt"), 100, {os.getuid() + 1}) is None  # foreign owner
        with pytest.raises(OSError):  # O_NOFOLLOW: ELOOP, never the target
            write_file(root_fd, parts("link"), b"overwrite through the link?", owner=None)
        with pytest.raises(OSError):
            write_file(root_fd, parts("dirlink/escape.txt"), b"x", owner=None)
        with pytest.raises(OSError):  # not a regular file: refused, and the open does not block
            write_file(root_fd, parts("fifo"), b"x", owner=None)
        write_file(root_fd, parts("sub/dir/ok.txt"), b"new", owner=None)  # a regular file is replaced
        assert read_file(root_fd, parts("sub/dir/ok.txt"), 100, me) == b"new"
    finally:
        os.close(root_fd)
    assert secret.read_text() == "top secret"
    assert not (tmp_path / "escape.txt").exists()


def test_stale_workspaces_of_dead_servers_are_removed(tmp_path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f"server-{dead.pid}-abc" / "slot-0").mkdir(parents=True)
    (tmp_path / f"server-{os.getpid()}-def").mkdir()  # our own: alive, kept
    (tmp_path / "uid-blocks").mkdir()  # not a workspace, kept
    remove_stale_workspaces(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"server-{os.getpid()}-def", "uid-blocks"])


def test_capped_output_keeps_the_head_and_counts_the_rest() -> None:
    read_fd, write_fd = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.set_blocking(read_fd, False)
    try:
        stream = CappedOutput(read_fd, cap=10, devnull_fd=devnull)
        os.write(write_fd, b"0123456789abcdef" + "é".encode())
        os.close(write_fd)
        while stream.pump():
            pass
        while not stream.eof:
            stream.pump()
        assert stream.dropped == 8
        assert stream.text().startswith("0123456789\n")
        assert "8 more bytes" in stream.text()
    finally:
        os.close(read_fd)
        os.close(devnull)


def test_undecodable_output_becomes_replacement_characters() -> None:
    read_fd, write_fd = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        stream = CappedOutput(read_fd, cap=100, devnull_fd=devnull)
        os.write(write_fd, b"ok \xff\xfe\x00 end")
        os.close(write_fd)
        while not stream.eof:
            stream.pump()
        assert stream.text() == "ok \ufffd\ufffd\x00 end"
    finally:
        os.close(read_fd)
        os.close(devnull)


def test_settings_from_environment() -> None:
    env = {
        "RETOOL_SANDBOX_WORKERS": "3", "RETOOL_SANDBOX_PRELOAD": "math, json", "RETOOL_SANDBOX_TOKEN": "t",
        "RETOOL_SANDBOX_MAX_QUEUE": "7", "UNRELATED": "x",
    }
    settings = SandboxSettings.from_env(env)
    assert (settings.workers, settings.preload, settings.token, settings.max_queue) == (3, ["math", "json"], "t", 7)
    assert SandboxSettings.from_env(env, max_queue=9).max_queue == 9
    assert SandboxSettings.from_env({}).pool_size() == (os.cpu_count() or 1)
    with pytest.raises(SandboxSettingsError, match="invalid sandbox settings"):
        SandboxSettings.from_env({"RETOOL_SANDBOX_WORKERS": "zero"})


def test_pool_queues_in_order_and_refuses_beyond_the_queue() -> None:
    async def scenario() -> list[str]:
        slots = [SlotSpec(index=0, scratch="/nonexistent", workdir="/nonexistent/upper/tmp", uid=None)]
        pool = SlotPool(slots, max_queue=2)
        first = await pool.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            slot = await pool.acquire()
            order.append(name)
            pool.release(slot)

        tasks = [asyncio.create_task(waiter("a")), asyncio.create_task(waiter("b"))]
        await asyncio.sleep(0)
        assert (pool.busy, pool.waiting) == (1, 2)
        with pytest.raises(QueueFullError):
            await pool.acquire()
        pool.release(first)
        await asyncio.gather(*tasks)
        assert (pool.busy, pool.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "b"]


def test_cancelled_waiter_does_not_lose_the_slot() -> None:
    async def scenario() -> int:
        pool = SlotPool([SlotSpec(index=0, scratch="/x", workdir="/x/upper/tmp", uid=None)], max_queue=4)
        held = await pool.acquire()
        task = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        task.cancel()
        pool.release(held)
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await asyncio.wait_for(pool.acquire(), 1)
        return again.index

    assert asyncio.run(scenario()) == 0


def test_status_mapping_matches_sandboxfusion() -> None:
    ok = to_response(ExecutionOutcome(kind="finished", return_code=0, stdout="1\n"))
    assert (ok.status.value, ok.run_result.status.value, ok.run_result.return_code) == ("Success", "Finished", 0)
    failed = to_response(ExecutionOutcome(kind="finished", return_code=3))
    assert (failed.status.value, failed.run_result.status.value) == ("Failed", "Finished")
    slow = to_response(ExecutionOutcome(kind="timeout", stdout="partial"))
    assert (slow.status.value, slow.run_result.status.value, slow.run_result.return_code) == (
        "Failed", "TimeLimitExceeded", None,
    )
    broken = to_response(ExecutionOutcome(kind="error", message="zygote died"))
    assert (broken.status.value, broken.run_result.status.value, broken.message) == ("SandboxError", "Error", "zygote died")


def test_the_sandbox_package_imports_nothing_of_ours() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sandbox"
    ours = {"reconciler", "runtime", "bench", "tests"}
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ours]
    assert found == []


def test_absolute_paths_only_where_a_view_exists_and_never_into_kernel_trees() -> None:
    from sandbox.paths import UnsafePathError, check_path
    from sandbox.view import in_kernel_tree, upper_path

    assert check_path("/mnt/b", allow_absolute=True) == (True, ("mnt", "b"))
    assert check_path("a/./b", allow_absolute=True) == (False, ("a", "b"))
    for path in ("/mnt/b", "/"):
        with pytest.raises(UnsafePathError):
            check_path(path, allow_absolute=path == "/")
    with pytest.raises(UnsafePathError, match="'..'"):
        check_path("/tmp/../etc/passwd", allow_absolute=True)
    assert upper_path(("var", "tmp", "x")) == upper_path(("dev", "shm", "x")) == ("tmp", "x")
    assert upper_path(("mnt", "b")) == ("mnt", "b")
    assert [in_kernel_tree(p) for p in [("proc", "1"), ("dev", "sda"), ("sys",), ("dev", "shm", "x"), ("mnt",)]] == [
        True, True, True, False, False,
    ]


def test_reset_upper_empties_the_layer_and_keeps_tmp_and_the_writable_dirs(tmp_path) -> None:
    from sandbox.view import reset_upper

    upper = tmp_path / "upper"
    (upper / "tmp" / "deep").mkdir(parents=True)
    (upper / "tmp" / "deep" / "f").write_text("x")
    (upper / "etc").mkdir()
    (upper / "etc" / "passwd").write_text("changed")
    (upper / "mnt").mkdir()
    (upper / "mnt" / "b").write_text("sauce")
    (upper / "link").symlink_to(tmp_path)
    tmp_inode = (upper / "tmp").stat().st_ino
    reset_upper(str(upper), None, opaque=False, writable={"mnt": 0o755})
    assert sorted(p.name for p in upper.iterdir()) == ["mnt", "tmp"]
    assert list((upper / "tmp").iterdir()) == [] and list((upper / "mnt").iterdir()) == []
    assert (upper / "tmp").stat().st_ino == tmp_inode  # kept: a bind mount of it stays valid
    assert oct((upper / "tmp").stat().st_mode & 0o777) == "0o700"
    assert tmp_path.exists()  # the symlink was removed, not followed
