"""Live logs kept off the volume (runtime/modal/live_logs.py), with real files."""

from __future__ import annotations

from pathlib import Path

from runtime.modal.live_logs import LiveLogs


def test_an_attempt_appends_to_the_volumes_log_not_to_a_stale_local_copy(tmp_path: Path) -> None:
    """A container that ran an earlier input keeps its local copy of a log; another container
    appended to the volume's since. The next attempt in the first container must continue the
    volume's log: appending to its stale copy and syncing it back would drop those lines."""
    volume, disk = tmp_path / "volume" / "logs", tmp_path / "disk"
    first = LiveLogs(volume, local_root=disk)
    with first.live("segment-0-rank-0.log").open("a") as log:
        log.write("attempt 1 (this container)\n")
    first.sync()
    with (volume / "segment-0-rank-0.log").open("a") as log:  # another container's attempt, committed
        log.write("attempt 2 (another container)\n")

    again = LiveLogs(volume, local_root=disk)  # a later input, run by the first container again
    with again.live("segment-0-rank-0.log").open("a") as log:
        log.write("attempt 3 (this container)\n")
    again.sync()
    assert (volume / "segment-0-rank-0.log").read_text().splitlines() == [
        "attempt 1 (this container)", "attempt 2 (another container)", "attempt 3 (this container)"]


def test_a_log_the_volume_no_longer_has_starts_empty(tmp_path: Path) -> None:
    volume, disk = tmp_path / "volume" / "logs", tmp_path / "disk"
    first = LiveLogs(volume, local_root=disk)
    with first.live("sandbox-0.log").open("a") as log:
        log.write("old run\n")
    first.sync()
    (volume / "sandbox-0.log").unlink()  # the run was moved aside (a rerun from scratch)
    again = LiveLogs(volume, local_root=disk)
    with again.live("sandbox-0.log").open("a") as log:
        log.write("new run\n")
    again.sync()
    assert (volume / "sandbox-0.log").read_text() == "new run\n"
