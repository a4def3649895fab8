"""The builtin tiny Qwen2: loads with transformers 5, chats in the hermes tool format verl parses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from runtime.data.files import tree_digest
from runtime.data.retool_sft import TOOLS, convert_solution, solution_text
from runtime.models.tiny import build_tiny_qwen2, parameter_count

CONVERSATION = convert_solution(
    "What is 12 * 34?", solution_text("Let me compute this with code.", "print(12 * 34)", "408", "\\boxed{408}")
)


def test_loads_as_qwen2_tokenizer_and_model_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert 150_000 <= parameter_count(tiny_model_dir) <= 400_000
    assert len(tok) <= model.config.vocab_size == 2048
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    prompt = tok.apply_chat_template(CONVERSATION[:1], tools=TOOLS, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5 or out[0, -1].item() == tok.eos_token_id
    assert torch.equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_chat_template_renders_tools_and_hermes_calls(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    assert (
        "<|im_start|>assistant\nLet me compute this with code.\n<tool_call>\n"
        '{"name": "code_interpreter", "arguments": {"code": "print(12 * 34)"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{408}<|im_end|>\n"
    ) in text
    # Encoding and decoding the rendered chat is lossless.
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_verl_hermes_parser_reads_the_rendered_call(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.tool_parser import ToolParser

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    start = text.index("Let me compute")
    response_ids = tok(text[start:text.index("<|im_end|>", start)], add_special_tokens=False)["input_ids"]
    parser = ToolParser.get_tool_parser("hermes", tok)
    content, calls = asyncio.run(parser.extract_tool_calls(response_ids))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("code_interpreter", {"code": "print(12 * 34)"})]
    assert content.strip() == "Let me compute this with code."


def test_messages_render_independently_as_verl_sft_requires(tiny_model_dir: Path) -> None:
    """verl tokenizes each message alone (system prompt stripped) and asserts the concatenation
    equals the whole conversation; arguments may also arrive as a JSON string."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    from runtime.models.chat_template import DEFAULT_SYSTEM

    system = tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM}], tokenize=False)
    whole = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    parts = [tok.apply_chat_template(CONVERSATION[:1], tools=TOOLS, tokenize=False)]
    parts += [tok.apply_chat_template([m], tokenize=False)[len(system):] for m in CONVERSATION[1:]]
    assert "".join(parts) == whole
    as_string = [dict(m) for m in CONVERSATION]
    call = as_string[1]["tool_calls"][0]["function"]
    as_string[1] = {**as_string[1], "tool_calls": [{"type": "function", "function": {**call, "arguments": json.dumps(call["arguments"])}}]}
    assert tok.apply_chat_template(as_string, tools=TOOLS, tokenize=False) == whole


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_qwen2(tmp_path / "again", seed=0)
    assert tree_digest(again) == tree_digest(tiny_model_dir)
    other = build_tiny_qwen2(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_options_override_the_architecture(tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = build_tiny_qwen2(tmp_path / "m", hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                           tokenizer_corpus_rows=200)
    config = AutoConfig.from_pretrained(str(out))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 1, 2, 1)
    assert parameter_count(out) < 150_000


@pytest.mark.parametrize(
    ("options", "match"),
    [({"hidden": 32}, "valid options"), ({"hidden_size": 30, "heads": 4}, "divisible")],
)
def test_bad_options_are_terminal_errors(tmp_path: Path, options: dict, match: str) -> None:
    with pytest.raises(TerminalError) as err:
        build_tiny_qwen2(tmp_path / "m", **options)
    assert match in str(err.value)
