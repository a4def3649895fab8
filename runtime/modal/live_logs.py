"""Logs that are open while training runs, kept off the checkpoint volume.

modal 1.6.4's `Volume.reload()` fails while any file on the volume is open ("there are open
files preventing the operation"), and `Volume.commit()` reloads after committing, so a log
held open on the volume makes every periodic commit raise. Live logs are therefore written
on the container's own disk and copied onto the volume (`_retool/logs/`) just before each
commit: each copy opens, writes and closes. A log that an earlier attempt left on the volume
is copied back first, so attempts keep appending to one file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path


class LiveLogs:
    def __init__(self, volume_dir: Path, local_root: Path | None = None) -> None:
        self.volume_dir = Path(volume_dir)
        tag = hashlib.sha256(str(self.volume_dir).encode()).hexdigest()[:12]
        self.local_dir = Path(local_root or tempfile.gettempdir()) / "retool-live-logs" / tag
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def live(self, name: str) -> Path:
        """A local path to append `name` to; the first time, it starts as the volume's copy.
        The volume's (reloaded when the attempt started) is the whole log so far: a local file
        left by an earlier input this container ran (Modal reuses warm containers; here, one
        /tmp shared by processes) may miss what other containers appended since, and copied
        back over the volume's it would drop their lines."""
        path = self.local_dir / name
        with self._lock:
            if name not in self._names:
                path.parent.mkdir(parents=True, exist_ok=True)
                saved = self.volume_dir / name
                if saved.is_file():
                    shutil.copyfile(saved, path)
                else:
                    path.unlink(missing_ok=True)
                self._names.add(name)
        return path

    def sync(self) -> None:
        """Copy every live log onto the volume (atomically per file; nothing stays open)."""
        with self._lock:
            names = sorted(self._names)
        for name in names:
            src = self.local_dir / name
            if not src.is_file():
                continue
            dest = self.volume_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
