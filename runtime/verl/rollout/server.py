"""The rollout server: the Ray actor verl's `LLMServerClient` sends `generate(...)` to.

Concurrent `generate` calls (verl's agent loops issue one per trajectory turn) queue up; a
batcher task takes everything waiting (up to `max_num_seqs`) and decodes it as one batch in
a worker thread, so the actor keeps accepting requests meanwhile. The rest of the surface
is what verl's replica and trainer call between rollouts: weight updates from the adapter,
sleep / wake-up (offload to host memory on CUDA, nothing to do on CPU), abort / resume.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.verl.rollout import ENV_DEVICE, ENV_DTYPE
from runtime.verl.rollout.engine import GenerationEngine, GenRequest, GenResult, default_dtype
from runtime.verl.rollout.sampling import RowParams
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.replica import TokenOutput

logger = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.02  # let requests issued together (one agent-loop step) land in one batch


@dataclass
class _Pending:
    request_id: str
    request: GenRequest
    future: asyncio.Future = field(repr=False)


def default_max_tokens(prompt_len: int, prompt_length: int, response_length: int) -> int:
    """vLLM server's default budget in verl: the response length, capped by what is left of
    prompt + response for this (possibly multi-turn) prompt; at least one token."""
    return max(1, min(response_length, prompt_length + response_length - prompt_len))


class TransformersServer:
    """Serves one rollout replica from a transformers model (wrapped with `ray.remote`)."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0):
        self.config = omega_conf_to_dataclass(config)
        model_path = _model_path(model_config)
        trust = bool(model_config.get("trust_remote_code", False))
        device = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, os.environ[ENV_DTYPE]) if os.environ.get(ENV_DTYPE) else default_dtype(
            device, self.config.dtype
        )
        if device == "cpu":
            # Ray pins actors to one thread; the trainer is idle while the rollout runs.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.engine = GenerationEngine.load(
            model_path, device=device, dtype=dtype, trust_remote_code=trust, seed=self.config.seed + replica_rank
        )
        self.replica_rank = replica_rank
        self.max_batch = max(1, int(self.config.max_num_seqs))
        self.global_steps: int | None = None
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._batcher: asyncio.Task | None = None
        self._abort = False  # running batch stops, queued requests return "aborted"
        self._gate = asyncio.Event()  # closed while aborted: new requests wait (or are rejected)
        self._gate.set()
        self._reject = False
        self._stats = {"requests": 0, "batches": 0, "max_batch": 0, "tokens": 0, "weight_updates": 0}
        logger.info("transformers rollout server %d: %s on %s (%s)", replica_rank, model_path, device, dtype)

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        **_: Any,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("the transformers rollout serves text-only models")
        if self._reject:
            return self._output(GenResult([], None, "aborted"))
        await self._gate.wait()
        params = dict(sampling_params)
        limit = params.get("max_tokens", params.get("max_new_tokens"))
        if limit is None:
            limit = default_max_tokens(len(prompt_ids), self.config.prompt_length, self.config.response_length)
        request = GenRequest(
            prompt_ids=[int(t) for t in prompt_ids],
            max_tokens=max(1, int(limit)),
            params=RowParams.from_dict(params),
            stop_ids=frozenset(int(t) for t in (params.get("stop_token_ids") or [])),
            logprobs=bool(params.get("logprobs")),
            ignore_eos=bool(params.get("ignore_eos", self.config.ignore_eos)),
        )
        loop = asyncio.get_running_loop()
        pending = _Pending(request_id, request, loop.create_future())
        self._queue.append(pending)
        self._idle.clear()
        self._wake.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_batches())
        return self._output(await pending.future)

    def _output(self, result: GenResult) -> TokenOutput:
        stop_reason = "aborted" if result.finish == "aborted" else "completed"
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs,
            stop_reason=stop_reason,
            extra_fields={"global_steps": self.global_steps},
        )

    async def _run_batches(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(BATCH_WINDOW_S)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            if not self._queue:
                self._wake.clear()
            if not batch:
                self._idle.set()
                continue
            try:
                results = await asyncio.to_thread(
                    self.engine.generate, [p.request for p in batch], lambda: self._abort
                )
            except Exception as exc:  # hand the failure to every waiting caller
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                results = None
            if results is not None:
                self._stats["requests"] += len(batch)
                self._stats["batches"] += 1
                self._stats["max_batch"] = max(self._stats["max_batch"], len(batch))
                self._stats["tokens"] += sum(len(r.token_ids) for r in results)
                for p, r in zip(batch, results):
                    if not p.future.done():
                        p.future.set_result(r)
            if not self._queue:
                self._idle.set()

    # ------------------------------------------------------------------ weights

    async def update_weights(self, weights: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        count = await asyncio.to_thread(self.engine.load_weights, weights.items())
        self._stats["weight_updates"] += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return count

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # ------------------------------------------------------------------ lifecycle (verl's replica/trainer calls)

    async def ready(self) -> dict[str, Any]:
        return {"device": self.engine.device, "dtype": str(next(self.engine.model.parameters()).dtype)}

    async def stats(self) -> dict[str, Any]:
        return dict(self._stats, global_steps=self.global_steps)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await asyncio.to_thread(self.engine.onload)

    async def sleep(self) -> None:
        await self.wait_for_requests_to_drain()
        await asyncio.to_thread(self.engine.offload)

    async def wait_for_requests_to_drain(self) -> None:
        await self._idle.wait()

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        self._gate.clear()
        self._reject = reject_request
        self._abort = True
        queued, self._queue = self._queue, []
        for p in queued:
            if not p.future.done():
                p.future.set_result(GenResult([], None, "aborted"))
        await self._idle.wait()  # the running batch stops at its next token
        return {"aborted_count": len(queued), "request_ids": [p.request_id for p in queued]}

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        for p in list(self._queue):
            if p.request_id == request_id:
                self._queue.remove(p)
                p.future.set_result(GenResult([], None, "aborted"))
                return {"aborted": True, "request_id": request_id}
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        self._abort = False
        self._reject = False
        self._gate.set()

    # KV cache lives only for one batch here; profiling is not wired.
    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


def _model_path(model_config: Any) -> str:
    """The local model directory of verl's model config (DictConfig or HFModelConfig, both
    answer `.get`; HFModelConfig has already fetched remote paths to `local_path`)."""
    path = getattr(model_config, "local_path", None) or model_config.get("path")
    if not path:
        raise ValueError("actor_rollout_ref.model.path is not set")
    return os.path.expanduser(str(path))
