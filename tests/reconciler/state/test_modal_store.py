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
