"""Model preparation: builtin, local path, Hugging Face (unreachable here)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from reconciler.errors import TerminalError
from reconciler.spec import Model
from runtime.data.files import tree_digest
from runtime.models import prepare, read_outputs, validate_model_dir


def test_builtin_is_written_atomically_with_meta_and_digest(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = prepare("tiny", Model(source="builtin:tiny-qwen2"), tmp_path / "tiny", tmp_path)
    assert out.path == str(tmp_path / "tiny")
    assert out.digest == tree_digest(tiny_model_dir)  # same options and seed -> same files
    assert json.loads((tmp_path / "tiny" / "meta.json").read_text())["digest"] == out.digest
    assert read_outputs(tmp_path / "tiny") == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_builtin_options_change_the_digest(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = prepare("t", Model(source="builtin:tiny-qwen2", options={"seed": 3, "tokenizer_corpus_rows": 200}), tmp_path / "t", tmp_path)
    assert out.digest != tree_digest(tiny_model_dir)


def test_path_source_copies_a_model_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    out = prepare("local", Model(source="path:src"), tmp_path / "vol" / "local", tmp_path)
    assert out.digest == tree_digest(tiny_model_dir)
    (src / "config.json").unlink()  # the prepared copy does not depend on the source afterwards
    validate_model_dir(Path(out.path))


def test_read_outputs_notices_changed_weights(tmp_path: Path) -> None:
    prepare("t", Model(source="builtin:tiny-qwen2", options={"tokenizer_corpus_rows": 200}), tmp_path / "t", tmp_path)
    (tmp_path / "t" / "model.safetensors").unlink()
    assert read_outputs(tmp_path / "t") is None


def test_path_that_is_not_a_model_dir_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(TerminalError) as err:
        prepare("bad", Model(source="path:bad"), tmp_path / "out", tmp_path)
    assert "not a Hugging Face model directory" in err.value.summary
    for problem in ("no model_type", "no weights", "no tokenizer"):
        assert problem in err.value.detail
    assert not (tmp_path / "out").exists()


def test_unknown_builtin_and_options_on_non_builtin(tmp_path: Path) -> None:
    """The spec rejects both when it loads (tests/reconciler/test_builtin_options.py); preparation
    still refuses a model built without validation."""
    gpt5 = {"source": "builtin:gpt5"}
    hf_with_options = {"source": "hf:Qwen/Qwen2.5-0.5B", "options": {"hidden_size": 8}}
    for fields in (gpt5, hf_with_options):
        with pytest.raises(ValidationError):
            Model.model_validate(fields)
    with pytest.raises(TerminalError, match="unknown builtin model"):
        prepare("x", Model.model_construct(**gpt5), tmp_path / "x", tmp_path)
    with pytest.raises(TerminalError, match="only apply to builtin"):
        prepare("x", Model.model_construct(**hf_with_options), tmp_path / "x", tmp_path)


def test_unreachable_hub_fails_fast_naming_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.sandbox_process import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TerminalError) as err:
        prepare("qwen", Model(source="hf:Qwen/Qwen2.5-7B-Instruct"), tmp_path / "q", tmp_path)
    assert "Qwen/Qwen2.5-7B-Instruct" in err.value.summary and "unreachable" in err.value.summary
    assert time.monotonic() - started < 30
    assert not (tmp_path / "q").exists()
