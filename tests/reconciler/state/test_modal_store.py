"""The shared store's Modal-specific behaviour (the common contract is tests/reconciler/state/test_state_contract.py):
where the files go, the last-seen mirror for planning without credentials, lock expiry kept
fresh by its holder's writes, and why state never lives in the Dict."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from reconciler.errors import StateLockedError, TerminalError
from reconciler.loader import load_spec
from reconciler.state.base import LockInfo, State
from reconciler.state.modal_store import ModalStore
from tests.fakes.fake_modal import DICT_TTL_S, FakeModal

REPO = Path(__file__).resolve().parents[3]


def test_state_and_backup_live_on_the_volume_the_lock_in_the_dict() -> None:
    fake = FakeModal()
    store = ModalStore.from_spec(load_spec(REPO / "specs" / "retool-qwen7b.yaml").spec, adapter=fake)
    assert store.describe() == "Modal volume retool-state:/retool-qwen7b/state.json"
    store.write(State(serial=1, lineage="L"))
    store.write(State(serial=2, lineage="L"))
    files = fake.volumes["retool-state"]
    assert json.loads(files["retool-qwen7b/state.json"])["serial"] == 2
    assert json.loads(files["retool-qwen7b/state.json.backup"])["serial"] == 1
    store.lock(LockInfo(command="retool apply"))
    assert "retool-qwen7b" in fake.dicts["retool-locks"]
    assert all(op[0] != "dict_put" or op[1] == "retool-locks" for op in fake.ops)


def test_without_credentials_or_an_answer_every_call_fails_clearly() -> None:
    """(plan and status then use reconciler.state.cache's local copy; apply stops)"""
    from runtime.modal.adapter import ModalUnreachable

    fake = FakeModal()
    store = ModalStore("v", "d", "k", adapter=fake)
    store.write(State(serial=1, lineage="L"))
    fake.token = False
    with pytest.raises(TerminalError) as exc:
        store.read()
    assert "modal token new" in exc.value.hint
    fake.token, fake.reachable = True, False
    for call in (store.read, lambda: store.lock(LockInfo()), lambda: store.write(State(serial=2, lineage="L"))):
        with pytest.raises(ModalUnreachable):
            call()


def test_the_holders_writes_keep_its_lock_fresh() -> None:
    fake = FakeModal()
    store = ModalStore("v", "d", "k", adapter=fake, lock_ttl_s=60)
    info = LockInfo()
    store.lock(info)
    first = store.lock_info()
    assert first is not None and first.expires_at is not None
    time.sleep(0.01)
    store.write(State(serial=1, lineage="L"))
    later = store.lock_info()
    assert later is not None and later.id == info.id and later.expires_at > first.expires_at  # type: ignore[operator]
    # a force-unlocked holder's writes do not resurrect its lock
    store.unlock(info.id)
    store.write(State(serial=2, lineage="L"))
    assert store.lock_info() is None


def test_dict_entries_expire_when_idle_so_state_never_lives_there() -> None:
    now = [0.0]
    fake = FakeModal(clock=lambda: now[0])
    store = ModalStore("v", "d", "k", adapter=fake)
    store.write(State(serial=5, lineage="L"))
    store.lock(LockInfo())
    with pytest.raises(StateLockedError):
        store.lock(LockInfo())
    now[0] += DICT_TTL_S + 1  # a week without a read or write
    assert store.lock_info() is None  # the lock entry is gone...
    assert store.read().serial == 5  # type: ignore[union-attr]  # ...the state on the volume is not


# --------------------------------------------------------------------------- expiry and heartbeat


def test_a_dead_runners_lock_expires_within_minutes_and_the_next_apply_takes_it() -> None:
    """A CI runner cancelled mid-apply stops renewing; after the TTL (5 min by default)
    the next apply takes the lock over with a note, without `retool state unlock`."""
    now = [1000.0]
    fake = FakeModal(clock=lambda: now[0])
    runner = ModalStore("v", "d", "k", adapter=fake, clock=lambda: now[0])
    laptop = ModalStore("v", "d", "k", adapter=fake, clock=lambda: now[0])
    assert runner.lock_ttl_s == 300 and runner.heartbeat_s == 60
    dead = LockInfo(command="retool apply specs/x.yaml --yes --no-wait")
    runner.lock(dead)
    now[0] += 240
    runner.renew(dead.id)  # a heartbeat 4 minutes in keeps it
    now[0] += 299
    with pytest.raises(StateLockedError, match="retool apply specs/x.yaml"):
        laptop.lock(LockInfo())
    now[0] += 2  # the runner died right after its last heartbeat: 301 s without one
    mine = LockInfo()
    assert laptop.lock(mine) == mine.id
    assert laptop.taken_over is not None and laptop.taken_over.previous.id == dead.id
    assert "stopped renewing its lock (expired 1s ago); continuing" in laptop.taken_over.note
    assert laptop.lock_info().id == mine.id  # type: ignore[union-attr]
    runner.renew(dead.id)  # a late heartbeat of the old holder does not resurrect its lock
    assert laptop.lock_info().id == mine.id  # type: ignore[union-attr]


def test_only_one_apply_takes_over_an_expired_lock() -> None:
    """Two appliers see the same expired lock; a put-if-absent claim per expired lock id
    lets exactly one remove it."""
    now = [0.0]
    fake = FakeModal(clock=lambda: now[0])
    ModalStore("v", "d", "k", adapter=fake, clock=lambda: now[0]).lock(LockInfo(id="deadbeef0001"))
    now[0] += 301
    fake.dict_put("d", "k#takeover-deadbeef0001", "other-apply", skip_if_exists=True)  # the other one got there first
    with pytest.raises(StateLockedError, match="another apply is taking it over"):
        ModalStore("v", "d", "k", adapter=fake, clock=lambda: now[0]).lock(LockInfo())
    assert ModalStore("v", "d", "k", adapter=fake).lock_info().id == "deadbeef0001"  # type: ignore[union-attr]


def test_holding_renews_from_a_thread_while_the_apply_runs() -> None:
    """reconciler.state.lease.holding: the heartbeat thread renews until the block ends,
    then the lock is released and the thread is gone."""
    import threading

    from reconciler.state.lease import holding

    fake = FakeModal()
    store = ModalStore("v", "d", "k", adapter=fake, lock_ttl_s=0.05)  # beats every 10 ms
    with holding(store, LockInfo()) as lock_id:
        first = store.lock_info().expires_at  # type: ignore[union-attr]
        deadline = time.time() + 30
        while store.lock_info().expires_at == first and time.time() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert store.lock_info().expires_at > first  # type: ignore[union-attr, operator]
        assert store.lock_info().id == lock_id  # type: ignore[union-attr]
    assert store.lock_info() is None
    assert not [t for t in threading.enumerate() if t.name == "retool-lock-heartbeat"]
