"""One contract, every store (docs/state.md, "Stores"; Terraform's `TestFull`).

`STORE_FACTORIES` maps a store name to a factory `factory(tmp_path) -> open()`, where
each `open()` returns a new handle on the same underlying store (as a second process
would see it). Another store joins the suite by adding its factory here, and a way to
leave behind the lock of a holder that is gone to `GONE_HOLDERS` (the local store's
holder is a real process killed with SIGKILL; a shared store's holder stopped renewing).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.errors import StateLockedError, TerminalError
from reconciler.state.base import LocalRun, LockInfo, NodeRecord, RunHandle, State, StateStore
from reconciler.state.local import LocalStore
from reconciler.state.memory import MemoryStore

Opener = Callable[[], StateStore]


def _local(tmp_path: Path) -> Opener:
    return lambda: LocalStore(tmp_path / ".retool")


def _memory(tmp_path: Path) -> Opener:
    store = MemoryStore()
    return lambda: store


def _modal(tmp_path: Path) -> Opener:
    """The shared store on the fake Modal: every handle sees the same volume and dict."""
    from reconciler.state.modal_store import ModalStore
    from tests.fakes.fake_modal import FakeModal

    fake = FakeModal()
    return lambda: ModalStore("retool-state", "retool-locks", "demo", adapter=fake)


def _shared_dir(tmp_path: Path) -> Opener:
    """The Ray backend's store: files and a lease lock in a directory every node mounts."""
    from reconciler.state.shared_dir import SharedDirStore

    return lambda: SharedDirStore(tmp_path / "storage" / ".retool-state" / "demo")


STORE_FACTORIES: dict[str, Callable[[Path], Opener]] = {
    "local": _local, "memory": _memory, "modal": _modal, "shared_dir": _shared_dir,
}
# Stores whose lock is an OS lock (a live holder is a live process; nothing is judged stale).
OS_LOCKED = {"local"}

HOLD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from reconciler.state.base import LockInfo
    from reconciler.state.local import LocalStore
    LocalStore(sys.argv[1]).lock(LockInfo(command="retool apply held.yaml"))
    print("held", flush=True)
    time.sleep(600)
    """
)


def hold_local_lock(directory: Path) -> subprocess.Popen[str]:
    """A real process that takes the local lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _gone_local(tmp_path: Path, opener: Opener) -> LockInfo:
    proc = hold_local_lock(tmp_path / ".retool")
    info = opener().lock_info()
    proc.kill()
    proc.wait()
    assert info is not None and info.pid == proc.pid
    return info


def _gone_shared(tmp_path: Path, opener: Opener) -> LockInfo:
    info = LockInfo(host="ci-runner-7", who="ci@ci-runner-7", command="retool apply x.yaml", expires_at=time.time() - 600)
    opener().lock(info)
    return info


GONE_HOLDERS: dict[str, Callable[[Path, Opener], LockInfo]] = {
    "local": _gone_local, "memory": _gone_shared, "modal": _gone_shared, "shared_dir": _gone_shared,
}


class Stores:
    """`opener()` plus which store it opens."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name, self.tmp_path = name, tmp_path
        self.open = STORE_FACTORIES[name](tmp_path)

    def __call__(self) -> StateStore:
        return self.open()

    def leave_gone_holder(self) -> LockInfo:
        return GONE_HOLDERS[self.name](self.tmp_path, self.open)


@pytest.fixture(params=sorted(STORE_FACTORIES))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    stores = Stores(request.param, tmp_path)
    yield stores
    if request.param == "local":  # this process's locks outlive the handles: give them back
        from reconciler.state import local

        for key in [k for k in local._HELD if k.startswith(str(tmp_path.resolve()))]:
            held = local._HELD.pop(key)
            os.close(held.fd)


def dead_pid() -> int:
    """The pid of a process that has exited (a real one, reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def sample_state(serial: int = 1, lineage: str = "lineage-a") -> State:
    return State(
        serial=serial,
        lineage=lineage,
        spec_name="demo",
        nodes={
            "stage.sft": NodeRecord(
                address="stage.sft", kind="stage", status="running", restart_id="r" * 64,
                outputs={"final_step": 40}, steps_done=40, total_steps=100,
                run=RunHandle(ref=LocalRun(pid=1234, pgid=1234, log_path="/tmp/sft.log"), command=["torchrun", "x"]),
            ),
            "volume.data": NodeRecord(address="volume.data", kind="volume", status="succeeded"),
        },
    )


# --------------------------------------------------------------------------- read / write


def test_empty_store_reads_none(opener: Opener) -> None:
    assert opener().read() is None


def test_write_then_read_round_trips(opener: Opener) -> None:
    state = sample_state()
    opener().write(state)
    got = opener().read()
    assert got is not None
    assert got.model_dump() == state.model_dump()
    assert got.nodes["stage.sft"].run is not None and got.nodes["stage.sft"].run.ref == LocalRun(pid=1234, pgid=1234, log_path="/tmp/sft.log")


def test_successive_serials_are_accepted(opener: Opener) -> None:
    store = opener()
    for serial in (1, 2, 5):
        store.write(sample_state(serial))
    assert store.read().serial == 5  # type: ignore[union-attr]


@pytest.mark.parametrize("serial", [3, 2])
def test_write_refuses_serial_not_newer(opener: Opener, serial: int) -> None:
    store = opener()
    store.write(sample_state(3))
    with pytest.raises(TerminalError, match=f"serial {serial} over serial 3"):
        opener().write(sample_state(serial))
    assert opener().read().serial == 3  # type: ignore[union-attr]


def test_write_refuses_other_lineage(opener: Opener) -> None:
    opener().write(sample_state(1, "lineage-a"))
    with pytest.raises(TerminalError, match="lineage"):
        opener().write(sample_state(2, "lineage-b"))
    assert opener().read().lineage == "lineage-a"  # type: ignore[union-attr]


def test_caller_mutation_does_not_leak_into_store(opener: Opener) -> None:
    store = opener()
    state = sample_state()
    store.write(state)
    state.nodes["stage.sft"].status = "failed"
    read = store.read()
    assert read is not None and read.nodes["stage.sft"].status == "running"
    read.nodes["volume.data"].status = "lost"
    assert store.read().nodes["volume.data"].status == "succeeded"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- lock


def test_lock_returns_its_id_and_records_holder(opener: Stores) -> None:
    info = LockInfo(command="retool apply specs/x.yaml")
    assert opener().lock(info) == info.id
    held = opener().lock_info()
    assert held is not None
    assert (held.id, held.pid, held.host, held.user, held.command) == (
        info.id, os.getpid(), socket.gethostname(), info.user, "retool apply specs/x.yaml"
    )


def test_second_lock_is_refused_naming_the_holder(opener: Stores) -> None:
    first = LockInfo(command="retool apply specs/a.yaml", created_at=time.time() - 125)
    opener().lock(first)
    with pytest.raises(StateLockedError) as exc:
        opener().lock(LockInfo(command="retool apply specs/b.yaml"))
    text = str(exc.value)
    assert first.who in text
    assert "retool apply specs/a.yaml" in text
    assert "2m" in text  # its age
    if opener.name in OS_LOCKED:  # nothing to unlock by hand: it frees itself when its holder exits
        assert f"pid {first.pid}" in text and "frees itself when that process exits" in text
    else:
        assert f"retool state unlock {first.id}" in text
    assert "stale" not in text
    assert opener().lock_info().id == first.id  # type: ignore[union-attr]


def test_unlock_refuses_wrong_id_and_keeps_lock(opener: Stores) -> None:
    info = LockInfo()
    opener().lock(info)
    with pytest.raises(TerminalError, match="does not match"):
        opener().unlock("not-the-id")
    assert opener().lock_info().id == info.id  # type: ignore[union-attr]


def test_unlock_frees_the_lock_for_the_next_holder(opener: Stores) -> None:
    info = LockInfo()
    opener().lock(info)
    opener().unlock(info.id)
    assert opener().lock_info() is None
    nxt = LockInfo()
    store = opener()
    assert store.lock(nxt) == nxt.id
    assert store.taken_over is None  # a released lock is no takeover


def test_unlock_without_lock_is_an_error(opener: Stores) -> None:
    with pytest.raises(TerminalError, match="not locked"):
        opener().unlock("abc")


def test_lock_of_a_gone_holder_is_taken_over_with_a_note(opener: Stores) -> None:
    """The local holder was kill -9'd (the kernel released its lock); a shared one stopped
    renewing and its lock expired. Either way the next lock goes ahead and says so."""
    gone = opener.leave_gone_holder()
    assert opener().lock_info() is None or opener.name not in OS_LOCKED
    store = opener()
    mine = LockInfo(command="retool apply specs/next.yaml")
    assert store.lock(mine) == mine.id
    assert store.taken_over is not None and store.taken_over.previous.id == gone.id
    note = store.taken_over.note
    assert note.startswith(f"previous apply (pid {gone.pid}") and note.endswith("; continuing")
    assert ("died" if opener.name in OS_LOCKED else "expired") in note
    assert opener().lock_info().id == mine.id  # type: ignore[union-attr]
    with pytest.raises(StateLockedError, match="specs/next.yaml"):  # and it is really held now
        opener().lock(LockInfo())


def test_renew_keeps_the_lock_and_ignores_a_lock_that_is_not_ours(opener: Stores) -> None:
    info = LockInfo()
    store = opener()
    store.lock(info)
    store.renew(info.id)
    store.renew("someone-else")
    held = opener().lock_info()
    assert held is not None and held.id == info.id
    if store.heartbeat_s is not None:  # an expiring lock moves its expiry forward
        assert held.expires_at is not None and held.expires_at > time.time()


@pytest.mark.parametrize("name", sorted(set(STORE_FACTORIES) - OS_LOCKED))
def test_shared_lock_held_by_dead_pid_is_reported_stale_not_stolen(name: str, tmp_path: Path) -> None:
    """A shared store never judges a pid dead to take its lock (another machine may share
    the host name); it names it stale with the unlock command, and it expires anyway."""
    opener = Stores(name, tmp_path)
    pid = dead_pid()
    stale = LockInfo(pid=pid, command="retool apply specs/a.yaml")
    opener().lock(stale)
    with pytest.raises(StateLockedError) as exc:
        opener().lock(LockInfo())
    text = str(exc.value)
    assert f"stale lock held by dead pid {pid}" in text
    assert f"retool state unlock {stale.id}" in text
    assert opener().lock_info().id == stale.id  # type: ignore[union-attr]
    opener().unlock(stale.id)
    assert opener().lock_info() is None


@pytest.mark.parametrize("name", sorted(set(STORE_FACTORIES) - OS_LOCKED))
def test_lock_from_another_host_is_never_judged_stale(name: str, tmp_path: Path) -> None:
    opener = Stores(name, tmp_path)
    other = LockInfo(pid=dead_pid(), host="some-other-host", who="ci@some-other-host", expires_at=time.time() + 300)
    opener().lock(other)
    with pytest.raises(StateLockedError) as exc:
        opener().lock(LockInfo())
    assert "stale" not in str(exc.value)
    assert "ci@some-other-host" in str(exc.value)


def test_lock_does_not_touch_state(opener: Stores) -> None:
    opener().write(sample_state(4))
    info = LockInfo()
    opener().lock(info)
    opener().unlock(info.id)
    assert opener().read().serial == 4  # type: ignore[union-attr]


# --------------------------------------------------------------------------- local file specifics


def test_local_keeps_backup_of_previous_state(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "st")
    store.write(sample_state(1))
    assert not store.backup_path.exists()
    store.write(sample_state(2))
    assert json.loads(store.backup_path.read_text())["serial"] == 1
    assert json.loads(store.path.read_text())["serial"] == 2
    # No temp files are left behind, and the directory is git-ignored.
    assert sorted(p.name for p in store.directory.iterdir()) == [".gitignore", "state.json", "state.json.backup"]
    assert "*" in (store.directory / ".gitignore").read_text()


def test_local_reads_leniently(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    data = sample_state(7).model_dump(mode="json")
    data["added_by_a_newer_version"] = {"x": 1}
    data["nodes"]["stage.sft"]["future_field"] = 3
    del data["nodes"]["volume.data"]["status"]  # missing keys take defaults
    store.path.write_text(json.dumps(data))
    got = store.read()
    assert got is not None and got.serial == 7
    assert got.nodes["volume.data"].status == "pending"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"serial": "many"}'])
def test_local_damaged_state_is_a_clear_error(tmp_path: Path, text: str) -> None:
    store = LocalStore(tmp_path)
    store.path.write_text(text)
    with pytest.raises(TerminalError) as exc:
        store.read()
    assert "not readable" in exc.value.summary
    assert "state.json.backup" in exc.value.hint


def test_local_read_does_not_create_the_directory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "nothing-here")
    assert store.read() is None and store.lock_info() is None
    assert not store.directory.exists()


def test_local_live_holder_is_refused_at_once_then_its_death_frees_the_lock(tmp_path: Path) -> None:
    """A real process holds the lock: refused, named, not stale, and `state unlock` cannot
    break it; kill -9 it and the next lock goes ahead noting the death."""
    store = LocalStore(tmp_path)
    holder = hold_local_lock(tmp_path)
    try:
        with pytest.raises(StateLockedError) as exc:
            store.lock(LockInfo())
        text = str(exc.value)
        assert f"pid {holder.pid}" in text and "retool apply held.yaml" in text and "stale" not in text
        assert f"kill {holder.pid}" in exc.value.hint
        held = store.lock_info()
        assert held is not None and held.pid == holder.pid
        with pytest.raises(TerminalError, match="held by a live process"):
            store.unlock(held.id)
    finally:
        holder.kill()
        holder.wait()
    assert store.lock_info() is None  # the kernel released it with the process
    info = LockInfo()
    assert store.lock(info) == info.id
    assert store.taken_over is not None
    assert store.taken_over.note.startswith(f"previous apply (pid {holder.pid}, `retool apply held.yaml`) died")
    store.unlock(info.id)
    assert not store.info_path.exists() and store.lock_path.exists()  # the lock file itself stays


def test_local_unlock_of_a_dead_holders_id_clears_its_leftover_info(tmp_path: Path) -> None:
    """`retool state unlock ID` from an old hint still works: the lock is already free."""
    holder = hold_local_lock(tmp_path)
    gone = LocalStore(tmp_path).lock_info()
    holder.kill()
    holder.wait()
    assert gone is not None
    store = LocalStore(tmp_path)
    store.unlock(gone.id)
    assert not store.info_path.exists()
    assert store.lock(LockInfo()) and store.taken_over is None


def test_local_damaged_lock_info_does_not_block(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.info_path.write_text('{"id": "abc", "pi')
    info = LockInfo()
    assert store.lock(info) == info.id
    assert store.taken_over is not None and store.taken_over.note.startswith("previous apply (unknown pid")
    assert LocalStore(tmp_path).lock_info().id == info.id  # type: ignore[union-attr]
    store.unlock(info.id)


def test_local_lock_fd_is_not_inherited_by_children(tmp_path: Path) -> None:
    """Stages are launched from the apply process and outlive it: they must not keep its
    lock alive after the apply is killed."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from reconciler.state.base import LockInfo
        from reconciler.state.local import LocalStore
        LocalStore(sys.argv[1]).lock(LockInfo())
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], close_fds=False)
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    apply_proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert apply_proc.stdout is not None
    child_pid = int(apply_proc.stdout.readline())
    try:
        assert LocalStore(tmp_path).lock_info() is not None
        apply_proc.kill()
        apply_proc.wait()
        os.kill(child_pid, 0)  # the stage-like child still runs...
        assert LocalStore(tmp_path).lock_info() is None  # ...and holds nothing
    finally:
        os.kill(child_pid, 9)


def test_local_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    """Real processes race for the lock at the same moment; exactly one wins."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from reconciler.errors import StateLockedError
        from reconciler.state.base import LockInfo
        from reconciler.state.local import LocalStore
        store = LocalStore({str(tmp_path)!r})
        while time.time() < float(sys.argv[1]):
            pass
        try:
            store.lock(LockInfo())
            print("won", flush=True)
            time.sleep(3)  # hold it while the others try (the kernel frees it at exit)
        except StateLockedError:
            print("refused", flush=True)
        """
    )
    start = time.time() + 2.0
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = sorted(p.communicate()[0].strip() for p in procs)
    assert results == ["refused", "refused", "refused", "won"]
