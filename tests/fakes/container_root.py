"""A fake container's own root file system, as Modal mounts one: the volumes at their mount
paths (`/checkpoints`, `/data`, …, each this container's view of the volume), retool's
packages where `add_local_python_source` puts them (`/root/runtime`, …), and the rest of
this machine as it is (the image's Python and packages are this checkout's environment).

`python -m tests.fakes.container_root SPEC -- ARGV…` runs inside a private mount namespace
(`unshare --mount --propagation private`, which needs root or user namespaces): it builds
the root in `SPEC.root` from bind mounts, `chroot`s into it, changes to `/root` (Modal's
working directory) and execs ARGV. Nothing is written outside `SPEC.root`: every mount
point is created there, and the mounts vanish with the namespace (the last process of the
container). Every process of the container, torchrun's, Ray's and vLLM's included, sees
the same paths, so files that name container paths (an eval job, a model's config) mean
the same thing inside as on Modal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

# what a container replaces: its mounts are its own (the volumes, /root)
MODAL_HOME = "/root"


class RootSpec(BaseModel):
    root: str  # host directory the container's root is built in
    mounts: dict[str, str]  # container path -> host directory (a volume view)
    sources: dict[str, str]  # package name -> host directory (placed under /root)
    # the container's own disk at /tmp (a container's /tmp is its own: Ray's sessions, live
    # logs, compile caches), with the host directories under /tmp the fake itself needs
    # (volume stores, requests, payloads) bound in at the same paths
    tmp: str | None = None
    keep: list[str] = []


def available() -> str | None:
    """Why containers cannot get their own root here (None: they can)."""
    if shutil.which("unshare") is None:
        return "no `unshare` on this machine"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`unshare --mount` refused: {probe.stderr.strip()[:200]}"


def command(spec_path: Path, argv: list[str]) -> list[str]:
    """The host command that runs `argv` in the container's own root."""
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "tests.fakes.container_root",
            str(spec_path), "--", *argv]


def _bind(src: str, dest: Path, *, recursive: bool = True) -> None:
    subprocess.run(["mount", "--rbind" if recursive else "--bind", src, str(dest)], check=True)


def _place(src: Path, dest: Path, *, recursive: bool = True) -> None:
    """Make `dest` (under the new root) show `src`: a link for a link, a bind mount otherwise."""
    if src.is_symlink():
        if not dest.is_symlink():
            dest.symlink_to(os.readlink(src))
        return
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.touch(exist_ok=True)
    _bind(str(src), dest, recursive=recursive)


def build(spec: RootSpec) -> Path:
    root = Path(spec.root)
    root.mkdir(parents=True, exist_ok=True)
    _bind(str(root), root)  # a mount point of its own, as a container's root is (the sandbox remounts it)
    nested = [m for m in spec.mounts if len(Path(m).parts) != 2]
    if nested:  # a mount point inside a bound host directory would have to be created on the host
        raise SystemExit(f"fake containers mount volumes at top-level paths only, not {nested[0]}")
    replaced = {Path(m).name for m in spec.mounts} | {MODAL_HOME.strip("/")} | ({"tmp"} if spec.tmp else set())
    for entry in sorted(Path("/").iterdir()):
        if entry.name not in replaced:
            _place(entry, root / entry.name)
    # /root: this machine's home (the interpreter and caches may live there), plus retool's packages
    home = root / MODAL_HOME.strip("/")
    home.mkdir(exist_ok=True)
    for entry in sorted(Path(MODAL_HOME).iterdir()):
        if entry.name not in spec.sources:
            _place(entry, home / entry.name)
    for name, src in sorted(spec.sources.items()):
        _place(Path(src), home / name)
    if spec.tmp:
        Path(spec.tmp).mkdir(parents=True, exist_ok=True)
        os.chmod(spec.tmp, 0o1777)
        _place(Path(spec.tmp), root / "tmp")
        for path in sorted(spec.keep):  # shorter paths first: a kept path may hold another
            if Path(path).is_relative_to("/tmp"):
                _place(Path(path), root / path.strip("/"), recursive=False)  # not this root's own mounts
    for mount, view in sorted(spec.mounts.items()):  # the volumes, each this container's view
        Path(view).mkdir(parents=True, exist_ok=True)  # filled by the container's first reload
        _place(Path(view), root / mount.strip("/"))
    return root


def main(argv: list[str]) -> int:
    split = argv.index("--")
    spec = RootSpec.model_validate_json(Path(argv[0]).read_text())
    run = argv[split + 1:]
    root = build(spec)
    os.chroot(root)
    os.chdir(MODAL_HOME)
    os.execvp(run[0], run)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
