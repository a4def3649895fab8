"""A slot's working directory, as the server (root) handles it around one execution:
write the request's files into it, read fetch_files out of it, empty it afterwards.

All path handling goes through `sandbox.paths` (no symlink is ever followed), so what a
program planted there cannot redirect the server's reads or writes.
"""

from __future__ import annotations

import base64
import os
import shutil

from sandbox.paths import read_file, write_file

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_files(workdir: str, files: dict[str, str], owner: int | None) -> None:
    """Write base64 `files` (paths already validated) as new files owned by `owner`."""
    root_fd = os.open(workdir, _DIR_FLAGS)
    try:
        for path, content in files.items():
            write_file(root_fd, path, base64.b64decode(content), owner)
    finally:
        os.close(root_fd)


def fetch_files(workdir: str, paths: list[str], owner: int | None, budget: int) -> dict[str, str]:
    """Base64 contents of the regular files among `paths` that the program's uid owns."""
    owners = {os.getuid() if owner is None else owner}
    found: dict[str, str] = {}
    root_fd = os.open(workdir, _DIR_FLAGS)
    try:
        for path in paths:
            data = read_file(root_fd, path, budget, owners)
            if data is not None:
                budget -= len(data)
                found[path] = base64.b64encode(data).decode()
    finally:
        os.close(root_fd)
    return found


def is_empty(workdir: str) -> bool:
    with os.scandir(workdir) as entries:
        return next(entries, None) is None


def reset(workdir: str, owner: int | None) -> None:
    """Remove everything inside `workdir` and give it back to `owner` with mode 0700."""
    root_fd = os.open(workdir, _DIR_FLAGS)
    try:
        for entry in os.scandir(root_fd):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, dir_fd=root_fd)
            else:
                os.unlink(entry.name, dir_fd=root_fd)
        if owner is not None:
            os.fchown(root_fd, owner, owner)
        os.fchmod(root_fd, 0o700)
    finally:
        os.close(root_fd)
