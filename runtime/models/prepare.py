"""Materialise one spec model as a Hugging Face model directory `<out_dir>/`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from reconciler.builtins import MODEL_BUILTINS
from reconciler.errors import TerminalError
from reconciler.spec import Model
from runtime.data.files import META_FILE, link_or_copy, manifest, staged_dir, tree_digest, unchanged_since_meta
from runtime.data.hub import download_failed, require_hub
from runtime.data.sources import resolve_path, split_source

BUILTINS: tuple[str, ...] = tuple(MODEL_BUILTINS)
# Files worth downloading from a Hub model repo (no duplicate .bin/.pth weights, no originals).
HF_ALLOW_PATTERNS: list[str] = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class ModelOutputs(BaseModel):
    """What a prepared model records in state (its digest is its output identity)."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="The Hugging Face model directory (actor_rollout_ref.model.path / model.path).")
    digest: str = Field(description="tree_digest of the directory (meta.json excluded).")


def prepare(name: str, model: Model, out_dir: Path, spec_dir: Path) -> ModelOutputs:
    """Build, download or copy the model into `out_dir`, atomically, and validate it."""
    kind, value = split_source(model.source)
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        if kind == "builtin":
            if value not in BUILTINS:
                raise TerminalError(f"unknown builtin model {value!r}", hint=f"builtins: {', '.join(BUILTINS)}")
            from runtime.models.tiny import build_tiny_qwen2

            build_tiny_qwen2(tmp, **dict(model.options))
        elif kind == "hf":
            if model.options:
                raise TerminalError(f"model {name}: `options` only apply to builtin models")
            _download(value, model.revision, tmp)
        elif kind == "path":
            if model.options:
                raise TerminalError(f"model {name}: `options` only apply to builtin models")
            src = resolve_path(value, Path(spec_dir))
            validate_model_dir(src)
            tmp.rmdir()
            shutil.copytree(src, tmp, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".git", META_FILE))
        else:
            raise TerminalError(f"model {name}: unknown source {model.source!r}")
        validate_model_dir(tmp)
        outputs = ModelOutputs(path=str(out_dir), digest=tree_digest(tmp))
        meta = {
            "name": name, "source": model.source, "revision": model.revision, "digest": outputs.digest,
            "manifest": manifest(tmp),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return outputs


def _download(repo_id: str, revision: str | None, dest: Path) -> None:
    require_hub("model", repo_id)
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(dest), allow_patterns=HF_ALLOW_PATTERNS)
    except Exception as exc:  # hub errors come in many types; all mean "not downloadable"
        raise download_failed("model", repo_id, exc) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local-dir bookkeeping


def validate_model_dir(path: Path) -> None:
    """Raise TerminalError listing every reason `path` is not a loadable HF causal-LM dir."""
    path = Path(path)
    if not path.is_dir():
        raise TerminalError(f"model directory {path} does not exist", hint="paths are relative to the spec file")
    problems: list[str] = []
    config = path / "config.json"
    if not config.is_file():
        problems.append("config.json is missing")
    else:
        try:
            if "model_type" not in json.loads(config.read_text()):
                problems.append("config.json has no model_type")
        except ValueError as exc:
            problems.append(f"config.json is not valid JSON ({exc})")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if problems:
        raise TerminalError(f"{path} is not a Hugging Face model directory", "; ".join(problems))


def read_outputs(out_dir: Path) -> ModelOutputs | None:
    """The outputs of an already prepared model dir, or None if absent or altered since."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not unchanged_since_meta(out_dir, meta) or not isinstance(meta.get("digest"), str):
        return None
    return ModelOutputs(path=str(out_dir), digest=meta["digest"])
