"""Paths a request may name (`files`, `fetch_files`): relative to the working directory, or
absolute inside the program's private view of the filesystem (when the server has one).

`check_path` is the pure gate the HTTP layer applies (`..`, empty components and NUL bytes are
always refused; absolute paths only where allowed). Whoever then touches the files (the
program process as root inside its view, the server in the slot's upper directory) walks the
path one component at a time with `O_NOFOLLOW` from a directory fd, so a symlink - planted by
the program or present on the host - is never followed on the way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(ValueError):
    """The path could escape the working directory or is malformed."""


def check_path(path: str, *, allow_absolute: bool) -> tuple[bool, tuple[str, ...]]:
    """(absolute?, components) of `path`, refusing anything that could escape or names nothing."""
    if not path or "\x00" in path:
        raise UnsafePathError(f"invalid path {path!r}: empty or contains a NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"invalid path {path!r}: not valid Unicode text") from None
    if path.startswith("\\"):
        raise UnsafePathError(f"invalid path {path!r}: backslash paths are not allowed")
    absolute = path.startswith("/")
    if absolute and not allow_absolute:
        raise UnsafePathError(
            f"invalid path {path!r}: absolute paths need the private filesystem view, which this server lacks "
            "(see /health isolation.notes)"
        )
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if not parts:
        raise UnsafePathError(f"invalid path {path!r}: names no file")
    if any(part == ".." for part in parts):
        raise UnsafePathError(f"invalid path {path!r}: '..' is not allowed")
    return absolute, parts


def check_relative_path(path: str) -> tuple[str, ...]:
    """Split `path` into components, refusing anything that is not a plain relative path."""
    return check_path(path, allow_absolute=False)[1]


def check_file_layout(paths: Iterable[str], *, allow_absolute: bool = False) -> None:
    """Refuse a set of files where one path is another's directory (cannot all be written)."""
    seen: set[tuple[str, ...]] = set()
    for path in paths:
        absolute, parts = check_path(path, allow_absolute=allow_absolute)
        seen.add(("/", *parts) if absolute else parts)
    for parts in seen:
        for cut in range(1, len(parts)):
            if parts[:cut] in seen:
                raise UnsafePathError(f"invalid files: {'/'.join(parts[:cut])!r} is both a file and a directory")


def _open_parent(root_fd: int, parts: tuple[str, ...], create: bool, owner: int | None) -> int:
    """Open the directory holding `parts[-1]`, never following a symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            if create:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    if owner is not None:
                        os.chown(name, owner, owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_file(root_fd: int, parts: tuple[str, ...], data: bytes, owner: int | None) -> None:
    """Write `parts` under the directory `root_fd` (replacing a regular file) and chown it to `owner`."""
    parent = _open_parent(root_fd, parts, create=True, owner=owner)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{'/'.join(parts)} exists and is not a regular file")
            if owner is not None:
                os.fchown(fd, owner, owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def read_file(root_fd: int, parts: tuple[str, ...], limit: int, owners: Iterable[int]) -> bytes | None:
    """Read a regular file under `root_fd`; None when missing, not regular, foreign or over `limit` bytes.

    `owners` are the uids the file may belong to: a hard link to someone else's file is refused.
    """
    try:
        parent = _open_parent(root_fd, parts, create=False, owner=None)
    except OSError:
        return None
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in set(owners) or info.st_size > limit:
            return None
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
