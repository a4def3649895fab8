"""A request's files around one execution: written by the program process (root, inside its
view, before it drops privileges) and read back by the server from the slot's directory.

All path handling goes through `sandbox.paths` (no symlink is ever followed), so what a
program planted, or what the host has, cannot redirect a read or a write.
"""

from __future__ import annotations

import base64
import os

from sandbox.paths import check_path, read_file, write_file
from sandbox.view import upper_path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_files(cwd: str, files: dict[str, str], owner: int | None) -> None:
    """Write base64 `files` (validated by the server) owned by `owner`: relative paths under
    `cwd`, absolute ones from this process's root (its private view)."""
    for path, content in files.items():
        absolute, parts = check_path(path, allow_absolute=True)
        root_fd = os.open("/" if absolute else cwd, _DIR_FLAGS)
        try:
            write_file(root_fd, parts, base64.b64decode(content), owner)
        finally:
            os.close(root_fd)


def write_source(cwd: str, name: str, code: str, owner: int | None) -> None:
    """The program's code as `name` in `cwd` (UTF-8), where `python name` would read it."""
    cwd_fd = os.open(cwd, _DIR_FLAGS)
    try:
        write_file(cwd_fd, (name,), code.encode("utf-8"), owner)
    finally:
        os.close(cwd_fd)


def fetch_files(
    workdir: str, upper: str | None, paths: list[str], owner: int | None, budget: int
) -> dict[str, str]:
    """Base64 contents of the regular files among `paths` that the program's uid owns.

    With a view (`upper` given), relative paths are under its /tmp and absolute ones are
    looked up in the upper layer, which holds exactly what the program wrote."""
    owners = {os.getuid() if owner is None else owner}
    found: dict[str, str] = {}
    root_fd = os.open(upper if upper is not None else workdir, _DIR_FLAGS)
    try:
        for path in paths:
            absolute, parts = check_path(path, allow_absolute=upper is not None)
            if upper is not None:
                parts = upper_path(parts) if absolute else ("tmp", *parts)
            data = read_file(root_fd, parts, budget, owners)
            if data is not None:
                budget -= len(data)
                found[path] = base64.b64encode(data).decode()
    finally:
        os.close(root_fd)
    return found
