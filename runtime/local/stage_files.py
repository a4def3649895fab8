"""runtime.stage_kind.StageFiles over a stage's directory on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import TransientError
from runtime import checkpoints as ckpts


@dataclass(frozen=True)
class LocalStageFiles:
    """One run directory (`<volume>/<stage>/<restart_id[:16]>`) and its stage's root."""

    root: Path
    run: Path

    @property
    def stage_root(self) -> str:
        return str(self.root)

    @property
    def run_dir(self) -> str:
        return str(self.run)

    def read_text(self, name: str) -> str | None:
        path = self.run / name
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientError(f"cannot read {path}", str(e)) from e

    def checkpoint_entries(self) -> list[ckpts.CkptEntry]:
        try:
            return ckpts.scan_local(self.root)
        except OSError as e:
            raise TransientError(f"cannot list checkpoints under {self.root}", str(e)) from e
