"""`builtin:tiny-qwen2`: a randomly initialised Qwen2 of a few hundred thousand parameters
with a locally trained tokenizer and a Qwen2.5-style chat template.

The tokenizer is a byte-level BPE trained with `tokenizers` on chat-rendered conversations
from the builtin problem generator, using Qwen2's pre-tokenizer regex, so transformers 5
(which rebuilds a `qwen2` tokenizer from its vocab and merges with that same regex) loads it
as `Qwen2Tokenizer` and tokenizes exactly as it was trained. Everything is seeded: the same
options give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from reconciler.builtins import TinyQwen2Options, option_names
from reconciler.errors import TerminalError
from runtime.models.chat_template import CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Qwen's chat tokens plus the hermes tool-call markers (single tokens, as in Qwen2.5).
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def parse_options(options: dict[str, Any]) -> TinyQwen2Options:
    """Validated options; unknown keys are a TerminalError naming the valid ones. The spec
    already checked them when it loaded; this guards direct callers."""
    try:
        return TinyQwen2Options.model_validate(options)
    except ValidationError as exc:
        raise TerminalError(
            "invalid options for builtin:tiny-qwen2",
            str(exc),
            f"valid options: {', '.join(option_names(TinyQwen2Options))}",
        ) from None


def tokenizer_corpus(rows: int, seed: int) -> list[str]:
    """Chat-rendered conversations like those the builtin datasets produce, plus general math text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from runtime.data.builtin import expected_sft_messages
    from runtime.data.problems import generate
    from runtime.data.retool_sft import TOOLS

    from runtime.models.corpus import sentences

    texts: list[str] = sentences(rows, seed)
    tools: list[dict[Any, Any] | Callable[..., Any]] = list(TOOLS)
    for problem in generate(rows, seed):
        messages = expected_sft_messages(problem)
        rendered = render_jinja_template(conversations=[messages], tools=tools, chat_template=CHAT_TEMPLATE)
        texts.append(rendered[0][0] if isinstance(rendered, tuple) else rendered[0])
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (`tokenizers.Tokenizer`) with Qwen2's pre-tokenizer and our tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = list(SPECIAL_TOKENS) + list(TOOL_TOKENS)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_qwen2(out_dir: Path, **options: Any) -> Path:
    """Write a loadable Hugging Face model dir (config, safetensors, tokenizer, chat template);
    `options` are TinyQwen2Options' (`seed` included)."""
    import torch
    from tokenizers import AddedToken
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    opts = parse_options(options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    raw = train_tokenizer(tokenizer_corpus(opts.tokenizer_corpus_rows, seed=10_000 + opts.seed), opts.vocab_size)
    model_json = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(
        # transformers 5.10 annotates merges as "a b" strings and unk_token as a string; both
        # go to tokenizers' BPE, which takes merge pairs and no unknown token (byte-level).
        vocab=model_json["vocab"], merges=merges,  # type: ignore[arg-type]
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        model_max_length=opts.max_position_embeddings,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    # Tool markers stay non-special (as in Qwen2.5) so decoding with skip_special_tokens keeps them.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) > opts.vocab_size:
        raise TerminalError("tiny tokenizer is larger than the model vocab", f"{len(tokenizer)} > {opts.vocab_size}")

    im_end, eot = token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")
    config = Qwen2Config(
        vocab_size=opts.vocab_size,
        hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_hidden_layers,
        num_attention_heads=opts.num_attention_heads,
        num_key_value_heads=opts.num_key_value_heads,
        max_position_embeddings=opts.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": opts.rope_theta},
        tie_word_embeddings=opts.tie_word_embeddings,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="float32",
    )
    torch.manual_seed(opts.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token of `tokenizer`'s vocabulary."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TerminalError(f"the tiny tokenizer maps {token!r} to {found!r}, not one id")
    return found


def parameter_count(model_dir: Path) -> int:
    """Number of parameters stored in a model dir's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total
