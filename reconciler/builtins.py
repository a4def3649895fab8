"""The builtin sources a spec may name (`builtin:<name>`) and the options each takes.

The spec checks a builtin's name, format and `options` against these models when it loads,
so `retool plan` reports a typo with its file, line and field before apply creates anything;
the runtime's generators and model builder parse their options with the same models.
Pydantic only: `retool plan` must not import torch or transformers.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reconciler.suggest import suggest

# The builtin problem sets (runtime.data.problems.PROBLEM_SETS): the builtin generators'
# `problems` option and the tool-call check's prompts.
ProblemSet = Literal["mixed", "fixed_shape"]

Section = Literal["datasets", "models"]


class BuiltinOptions(BaseModel):
    """Options of one builtin: unknown keys are errors, as everywhere in the spec."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GeneratorOptions(BuiltinOptions):
    """Options of a builtin generator (the spec's `datasets.<name>.options`)."""

    rows: int = Field(512, ge=1, le=1_000_000, description="Problems generated (one row each).")
    seed: int = Field(0, description="Seed of the problem stream: another seed draws other problems.")
    problems: ProblemSet = Field(
        "mixed", description="The problem set: `mixed`, nine word-problem templates; `fixed_shape`, `What is a op b?` "
        "(runtime.data.problems.PROBLEM_SETS).",
    )
    heldout: bool = Field(
        False, description="Draw from the held-out bucket, which no training set contains (for test sets)."
    )


class TinyQwen2Options(BuiltinOptions):
    """Options of `builtin:tiny-qwen2` (the spec's `models.<name>.options`)."""

    seed: int = Field(0, description="Seed of the weights' initialisation and of the tokenizer's corpus.")
    vocab_size: int = Field(2048, ge=512, le=65536, description="Vocabulary of the trained byte-level BPE.")
    hidden_size: int = Field(64, ge=16, description="Width of the model (a multiple of `heads`).")
    intermediate_size: int = Field(128, ge=16, description="Width of the MLP.")
    num_hidden_layers: int = Field(2, ge=1, alias="layers", description="Decoder layers.")
    # head_dim 32 by default: the least vLLM's CPU attention takes
    num_attention_heads: int = Field(2, ge=1, alias="heads", description="Attention heads (a multiple of `kv_heads`).")
    num_key_value_heads: int = Field(1, ge=1, alias="kv_heads", description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(2048, ge=128, description="Longest sequence (and the tokenizer's max length).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    tie_word_embeddings: bool = Field(True, description="Share the input embedding with the output head.")
    tokenizer_corpus_rows: int = Field(4000, ge=100, description="Conversations the BPE is trained on.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyQwen2Options:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "hidden_size must be divisible by heads, and heads by kv_heads (hidden_size "
                f"{self.hidden_size}, heads {self.num_attention_heads}, kv_heads {self.num_key_value_heads})"
            )
        return self


# Each builtin's options; for a generator, the rows it writes and the dataset formats they fit
# (runtime.data.formats: its SFT formats take messages+tools rows).
DATASET_BUILTINS: dict[str, type[BuiltinOptions]] = {"tiny_sft": GeneratorOptions, "tiny_math": GeneratorOptions}
GENERATOR_ROWS: dict[str, str] = {"tiny_sft": "messages+tools", "tiny_math": "verl RL"}
GENERATOR_FORMATS: dict[str, tuple[str, ...]] = {"tiny_sft": ("retool_sft", "messages"), "tiny_math": ("rl",)}
MODEL_BUILTINS: dict[str, type[BuiltinOptions]] = {"tiny-qwen2": TinyQwen2Options}
GENERATORS: tuple[str, ...] = tuple(DATASET_BUILTINS)

_BUILTINS: dict[Section, dict[str, type[BuiltinOptions]]] = {"datasets": DATASET_BUILTINS, "models": MODEL_BUILTINS}
_WHAT: dict[Section, str] = {"datasets": "builtin dataset generator", "models": "builtin model"}


def builtin_name(source: Any) -> str | None:
    """`tiny_sft` for `builtin:tiny_sft`; None for any other source."""
    if isinstance(source, str) and source.strip().startswith("builtin:"):
        return source.strip().removeprefix("builtin:").strip()
    return None


def options_model(section: Section, source: Any) -> type[BuiltinOptions] | None:
    """The options model of the builtin `source` names, or None (not a builtin, or unknown)."""
    name = builtin_name(source)
    return _BUILTINS[section].get(name) if name is not None else None


def option_keys(model: type[BaseModel]) -> list[str]:
    """The keys a spec writes for `model`'s options: a field's alias where it has one."""
    return sorted(f.alias or name for name, f in model.model_fields.items())


def option_names(model: type[BaseModel]) -> list[str]:
    """Every key `model` accepts: field names and their aliases."""
    return sorted({n for name, f in model.model_fields.items() for n in (name, f.alias) if n})


def check_builtin_name(section: Section, source: str) -> None:
    """A `builtin:` source must name a builtin that exists (ValueError with a did-you-mean)."""
    name = builtin_name(source)
    known = list(_BUILTINS[section])
    if name is not None and name not in known:
        raise ValueError(f"unknown {_WHAT[section]} {name!r} (builtins: {', '.join(known)}){suggest(name, known)}")


def check_generator_format(source: Any, fmt: str) -> None:
    """A builtin generator's rows fit only some formats (ValueError naming them)."""
    name = builtin_name(source)
    if name is None or name not in GENERATOR_FORMATS:
        return  # not a generator (an unknown one is the source's error)
    formats = GENERATOR_FORMATS[name]
    if fmt not in formats:
        choices = " or ".join(f"`format: {f}`" for f in formats)
        raise ValueError(f"builtin:{name} writes {GENERATOR_ROWS[name]} rows: use {choices} (got {fmt!r})")


def check_options(section: Section, source: Any, options: dict[str, Any]) -> None:
    """Validate `options` against the builtin `source` names; raises pydantic's
    ValidationError (its locations are the option keys) or ValueError.

    Only checks: the options stay as written, defaults unfilled, because they enter the
    node's fingerprint as they are (docs/change-policy.md, "Fingerprints")."""
    model = options_model(section, source)
    if model is not None:
        model.model_validate(options)
    elif builtin_name(source) is None and options:
        raise ValueError(f"`options` apply only to builtin sources; {source} would ignore them (remove `options`)")


def options_reference() -> str:
    """The table of every builtin's options, as docs/spec.md holds it (a test keeps it equal)."""
    rows = ["| source | option | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for section in ("datasets", "models"):
        models = list(dict.fromkeys(_BUILTINS[section].values()))
        for model in models:
            sources = ", ".join(f"`builtin:{n}`" for n, m in _BUILTINS[section].items() if m is model)
            for field_name, f in model.model_fields.items():
                rows.append(
                    f"| {sources} | `{f.alias or field_name}` | {_type_text(f.annotation, f.metadata)} "
                    f"| `{_yaml_text(f.default)}` | {f.description or ''} |"
                )
    return "\n".join(rows) + "\n"


def _type_text(annotation: Any, metadata: list[Any]) -> str:
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    text = getattr(annotation, "__name__", str(annotation))
    bounds = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"))
    for m in metadata:
        for kind, attr, sign in bounds:
            if isinstance(m, kind):
                text += f", {sign} {getattr(m, attr)}"
    return text


def _yaml_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
