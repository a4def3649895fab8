"""The fake's per-container volume views (tests/fakes/volume_views.py) follow Modal's rule:
another container's writes appear only after its commit and this one's reload; two commits
of one file keep the last; a file a container never touched is never sent."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.volume_views import VolumeStore, VolumeView


def views(tmp_path: Path) -> tuple[VolumeStore, VolumeView, VolumeView]:
    store = VolumeStore(tmp_path / "store")
    a, b = VolumeView(store, tmp_path / "a"), VolumeView(store, tmp_path / "b")
    a.reload()
    b.reload()
    return store, a, b


def test_a_write_is_seen_by_another_container_after_its_commit_and_the_readers_reload(tmp_path: Path) -> None:
    store, a, b = views(tmp_path)
    (a.work / "d").mkdir()
    (a.work / "d" / "x").write_text("1")
    b.reload()
    assert not (b.work / "d" / "x").exists() and not (store.root / "d" / "x").exists()  # not committed yet
    a.commit()
    assert (store.root / "d" / "x").read_text() == "1"
    assert not (b.work / "d" / "x").exists()  # committed, but b has not reloaded
    b.reload()
    assert (b.work / "d" / "x").read_text() == "1"


def test_concurrent_commits_of_one_file_keep_the_last(tmp_path: Path) -> None:
    store, a, b = views(tmp_path)
    (a.work / "f").write_text("a")
    (b.work / "f").write_text("b")
    a.commit()
    b.commit()
    assert (store.root / "f").read_text() == "b"
    a.reload()
    assert (a.work / "f").read_text() == "b"


def test_an_untouched_file_never_overwrites_another_containers_commit(tmp_path: Path) -> None:
    store, a, b = views(tmp_path)
    (a.work / "shared").write_text("old")
    a.commit()
    b.reload()
    (a.work / "shared").write_text("new")
    a.commit()
    (b.work / "own").write_text("b's")
    b.commit()  # b never changed `shared`: its stale copy is not sent
    assert (store.root / "shared").read_text() == "new" and (store.root / "own").read_text() == "b's"
    assert (b.work / "shared").read_text() == "new"  # commit reloads


def test_a_deletion_is_a_write_too(tmp_path: Path) -> None:
    store, a, b = views(tmp_path)
    (a.work / "m").write_text("marker")
    a.commit()
    b.reload()
    (b.work / "m").unlink()
    (a.work / "m").write_text("marker again")
    a.commit()
    b.commit()  # b's deletion lands last: the marker a wrote again is gone
    assert not (store.root / "m").exists()
    a.reload()
    assert not (a.work / "m").exists()


def test_what_a_container_never_commits_is_lost_with_it(tmp_path: Path) -> None:
    store, a, _ = views(tmp_path)
    (a.work / "shard").write_text("x")
    fresh = VolumeView(store, tmp_path / "a-restarted")
    fresh.reload()
    assert not (fresh.work / "shard").exists()


def test_the_cli_side_and_the_containers_share_a_directory_backed_volume(tmp_path: Path) -> None:
    from tests.fakes.fake_modal import FakeModal
    from tests.fakes.volume_views import DirVolume

    fake = FakeModal(volume_root=tmp_path / "volumes")
    assert fake.create_volume("data")
    volume = fake.volumes["data"]
    assert isinstance(volume, DirVolume)
    fake.put_files("data", {"sets/train.parquet": b"rows"})  # an upload from the CLI
    view = VolumeView(volume.store, tmp_path / "container")
    view.reload()
    assert (view.work / "sets" / "train.parquet").read_bytes() == b"rows"
    (view.work / "sets" / "stats.json").write_text("{}")
    assert [e.path for e in fake.listdir("data", "sets")] == ["sets/train.parquet"]  # not committed yet
    view.commit()
    assert fake.read_file("data", "sets/stats.json") == b"{}"
    fake.remove("data", "sets", recursive=True)
    assert fake.tree("data") == []
    view.reload()
    assert not (view.work / "sets").exists()
