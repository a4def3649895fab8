"""The eval tool loop with real parts: the builtin tiny Qwen2 and its chat template, RL's
transformers engine on CPU, the recipe's code rules and a real sandbox on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.data.retool_sft import TOOLS
from runtime.eval.engine import Sampling, TransformersEngine, model_max_len, pick_engine, vllm_sampling_args
from runtime.eval.toolloop import Conversation, LoopLimits, ToolCall, ToolLoop, parse_tool_calls, truncate_middle
from runtime.eval.tools import SandboxTools
from runtime.verl.recipe.sandbox_call import SandboxCallSettings

LIMITS = LoopLimits(
    max_prompt_length=512, max_response_length=48, max_assistant_turns=4, max_user_turns=4, max_tool_response_length=32
)
QUESTION = [{"role": "user", "content": "What is 6 * 7?\nThe answer format must be: \\boxed{'The final answer goes here.'}"}]




@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_parse_tool_calls_like_verls_hermes_parser() -> None:
    text = (
        'Let me compute.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
        "<tool_call>not json</tool_call>"
    )
    (call,) = parse_tool_calls(text)
    assert call.name == "code_interpreter" and json.loads(call.arguments) == {"code": "print(6*7)"}
    assert parse_tool_calls("<tool_call> unterminated") == []
    assert parse_tool_calls("no call") == []


def test_truncate_middle_like_verl() -> None:
    assert truncate_middle("short", 32) == "short"
    assert truncate_middle("a" * 10 + "b" * 10, 10) == "aaaaa...(truncated)...bbbbb"


def test_sandbox_tools_answer_like_rls_tool(session_sandbox_url: str) -> None:
    tools = SandboxTools(SandboxCallSettings(sandbox_url=session_sandbox_url, timeout_s=3, rate_limit=2, num_workers=2))
    out = tools([
        ToolCall("code_interpreter", json.dumps({"code": "x = 6 * 7\nx"})),  # the recipe wraps the last line in print
        ToolCall("code_interpreter", json.dumps({"code": "```python\nprint('fenced')\n```"})),
        ToolCall("code_interpreter", json.dumps({"code": "  "})),  # sent as is: the recipe's tool has no check
        ToolCall("code_interpreter", json.dumps({"source": "1"})),
        ToolCall("python", json.dumps({"code": "1"})),
        ToolCall("code_interpreter", "{not json"),
        ToolCall("code_interpreter", json.dumps({"code": "import time\ntime.sleep(30)"})),
    ])
    assert out[0] == "42\n"
    assert out[1] == "fenced\n"
    assert out[2].strip() == ""  # the sandbox ran it: no output
    assert out[3] == "Error executing tool 'code_interpreter': 'code'"  # the recipe tool's KeyError, as verl shows it
    assert out[4].startswith("Unknown function 'python'")
    assert out[5].startswith("Invalid JSON in arguments for 'code_interpreter'")
    assert out[6] == "no stdout here"  # the sandbox's time limit: the recipe's fixed text
    assert tools.calls == 4


def test_tool_turn_tokens_continue_the_templates_rendering(tokenizer, session_sandbox_url: str) -> None:  # type: ignore[no-untyped-def]
    """Prompt + generated assistant turn + tool turn == the chat template's rendering of
    that conversation (verl's continuous-token rule), and the tool really ran."""
    tools = SandboxTools(SandboxCallSettings(sandbox_url=session_sandbox_url, timeout_s=10))
    loop = ToolLoop(tokenizer, None, TOOLS, LoopLimits(512, 4096, 4, 4, 256), tools)  # type: ignore[arg-type]
    conv = loop.start(QUESTION)
    call = {"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}
    assistant_text = "I will compute.\n<tool_call>\n" + json.dumps(call) + "\n</tool_call><|im_end|>"
    conv.response_ids = tokenizer.encode(assistant_text, add_special_tokens=False)
    conv.assistant_turns = 1
    conv.pending = parse_tool_calls(assistant_text)
    loop._tools([conv])
    assert conv.user_turns == 1 and not conv.done
    expected = tokenizer.apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "I will compute.", "tool_calls": [{"type": "function", "function": call}]},
         {"role": "tool", "content": "42\n"}],
        tools=TOOLS, add_generation_prompt=True, tokenize=False,
    )
    assert tokenizer.decode(conv.prompt_ids + conv.response_ids) == expected


def test_a_tool_turn_that_overflows_the_budget_ends_the_sample(tokenizer, session_sandbox_url: str) -> None:  # type: ignore[no-untyped-def]
    tools = SandboxTools(SandboxCallSettings(sandbox_url=session_sandbox_url, timeout_s=10))
    loop = ToolLoop(tokenizer, None, TOOLS, LIMITS, tools)  # type: ignore[arg-type]
    conv = Conversation(messages=list(QUESTION), prompt_ids=[1, 2, 3], response_ids=[5] * 40, assistant_turns=1)
    conv.pending = [ToolCall("code_interpreter", json.dumps({"code": "print('x' * 500)"}))]
    loop._tools([conv])
    assert conv.done and conv.truncated and conv.user_turns == 0 and len(conv.response_ids) == 40


def test_loop_on_the_tiny_model_respects_every_budget(tiny_model_dir: Path, tokenizer, session_sandbox_url: str) -> None:  # type: ignore[no-untyped-def]
    engine = TransformersEngine(str(tiny_model_dir), Sampling(temperature=1.0, top_p=1.0, seed=0), batch_size=4, device="cpu")
    tools = SandboxTools(SandboxCallSettings(sandbox_url=session_sandbox_url, timeout_s=10))
    loop = ToolLoop(tokenizer, engine, TOOLS, LIMITS, tools)
    convs = [loop.start(QUESTION) for _ in range(6)]
    loop.run(convs)
    for conv in convs:
        assert conv.done
        assert 1 <= conv.assistant_turns <= LIMITS.max_assistant_turns
        assert len(conv.response_ids) <= LIMITS.max_response_length
        if len(conv.response_ids) >= LIMITS.max_response_length:
            assert conv.truncated
        assert conv.num_turns == conv.user_turns + conv.assistant_turns + 1
        assert isinstance(loop.response_text(conv), str)
    # an untrained model rambles: the 48-token budget cuts most samples
    assert any(c.truncated for c in convs)


def test_pick_engine() -> None:
    # auto: vLLM wherever it is installed (its CPU build without GPUs), else transformers
    assert pick_engine("auto", gpus=0, has_vllm=False) == "transformers"
    assert pick_engine("auto", gpus=0, has_vllm=True) == "vllm"
    assert pick_engine("auto", gpus=8, has_vllm=True) == "vllm"
    assert pick_engine("transformers", gpus=8, has_vllm=True) == "transformers"
    assert pick_engine("vllm", gpus=0, has_vllm=True) == "vllm"
    from reconciler.errors import TerminalError

    with pytest.raises(TerminalError, match="not installed"):
        pick_engine("vllm", gpus=0, has_vllm=False)


@pytest.mark.parametrize(("heads", "kv", "gpus", "tp"), [
    (28, 4, 8, 4),    # Qwen2.5-7B: 28 heads do not split 8 ways
    (40, 8, 8, 8),    # Qwen2.5-32B
    (14, 2, 8, 2),    # Qwen2.5-0.5B: 7 divides 14 heads but not its 2 KV heads' replication
    (14, 14, 8, 7),
    (64, 8, 8, 8),
    (12, 12, 1, 1),
    (32, 8, 0, 1),    # no GPU: one
])
def test_tensor_parallel_size_fits_the_heads(tmp_path: Path, heads: int, kv: int, gpus: int, tp: int) -> None:
    from runtime.eval.engine import tensor_parallel_size

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv}))
    assert tensor_parallel_size(str(tmp_path), gpus) == tp


def test_tensor_parallel_size_without_a_config_trusts_the_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    from runtime.eval.engine import tensor_parallel_size

    assert tensor_parallel_size(str(tmp_path), 8) == 8
    heads = json.loads((tiny_model_dir / "config.json").read_text())["num_attention_heads"]
    assert heads % tensor_parallel_size(str(tiny_model_dir), 3) == 0


def test_vllm_context_is_capped_at_the_models_positions(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    assert model_max_len(str(tmp_path), 2048 + 256) == 2048  # the tiny model with an eval's defaults
    assert model_max_len(str(tmp_path), 1024) == 1024
    assert model_max_len(str(tmp_path / "missing"), 4096) == 4096


def test_vllm_requests_are_seeded_except_where_vllm_cpu_cannot() -> None:
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    assert vllm_sampling_args(sampling, 16, 3)["seed"] == 10
    assert "seed" not in vllm_sampling_args(sampling, 16, 3, per_request_seed=False)
