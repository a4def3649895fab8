"""One contract, every store (STYLE.md #3, Terraform's `TestFull`).

`STORE_FACTORIES` maps a store name to a factory `factory(tmp_path) -> open()`, where
each `open()` returns a new handle on the same underlying store (as a second process
would see it). Another store joins the suite by adding its factory here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
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


STORE_FACTORIES: dict[str, Callable[[Path], Opener]] = {"local": _local, "memory": _memory, "modal": _modal}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return STORE_FACTORIES[request.param](tmp_path)


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


def test_lock_returns_its_id_and_records_holder(opener: Opener) -> None:
    info = LockInfo(command="retool apply specs/x.yaml")
    assert opener().lock(info) == info.id
    held = opener().lock_info()
    assert held is not None
    assert (held.id, held.pid, held.host, held.user, held.command) == (
        info.id, os.getpid(), socket.gethostname(), info.user, "retool apply specs/x.yaml"
    )


def test_second_lock_is_refused_naming_the_holder(opener: Opener) -> None:
    first = LockInfo(command="retool apply specs/a.yaml", created_at=time.time() - 125)
    opener().lock(first)
    with pytest.raises(StateLockedError) as exc:
        opener().lock(LockInfo(command="retool apply specs/b.yaml"))
    text = str(exc.value)
    assert first.who in text
    assert "retool apply specs/a.yaml" in text
    assert "2m" in text  # its age
    assert f"retool state unlock {first.id}" in text
    assert "stale" not in text
    assert opener().lock_info().id == first.id  # type: ignore[union-attr]


def test_unlock_refuses_wrong_id_and_keeps_lock(opener: Opener) -> None:
    info = LockInfo()
    opener().lock(info)
    with pytest.raises(TerminalError, match="does not match"):
        opener().unlock("not-the-id")
    assert opener().lock_info().id == info.id  # type: ignore[union-attr]


def test_unlock_frees_the_lock_for_the_next_holder(opener: Opener) -> None:
    info = LockInfo()
    opener().lock(info)
    opener().unlock(info.id)
    assert opener().lock_info() is None
    nxt = LockInfo()
    assert opener().lock(nxt) == nxt.id


def test_unlock_without_lock_is_an_error(opener: Opener) -> None:
    with pytest.raises(TerminalError, match="not locked"):
        opener().unlock("abc")


def test_lock_held_by_dead_pid_is_reported_stale_not_stolen(opener: Opener) -> None:
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


def test_lock_from_another_host_is_never_judged_stale(opener: Opener) -> None:
    other = LockInfo(pid=dead_pid(), host="some-other-host", who="ci@some-other-host")
    opener().lock(other)
    with pytest.raises(StateLockedError) as exc:
        opener().lock(LockInfo())
    assert "stale" not in str(exc.value)
    assert "ci@some-other-host" in str(exc.value)


def test_expired_lock_is_reported_stale(opener: Opener) -> None:
    expired = LockInfo(host="some-other-host", expires_at=time.time() - 600)
    opener().lock(expired)
    with pytest.raises(StateLockedError, match="stale lock .* expired"):
        opener().lock(LockInfo())


def test_lock_does_not_touch_state(opener: Opener) -> None:
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


def test_local_damaged_lock_file_still_blocks_and_can_be_cleared(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.lock_path.write_text('{"id": "abc", "pi')
    with pytest.raises(StateLockedError, match="retool state unlock damaged"):
        store.lock(LockInfo())
    store.unlock("damaged")
    assert store.lock_info() is None


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
            print("won")
        except StateLockedError:
            print("refused")
        """
    )
    start = time.time() + 2.0
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = sorted(p.communicate()[0].strip() for p in procs)
    assert results == ["refused", "refused", "refused", "won"]
