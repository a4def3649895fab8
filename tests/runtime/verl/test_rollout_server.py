"""The rollout server, replica and adapter on a real local Ray, with the builtin tiny Qwen2
(random weights; CPU). What verl's LLMServerClient and engine workers do, done directly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytest.importorskip("verl")
import ray  # noqa: E402
import torch  # noqa: E402

from runtime.verl.rollout import ENV_WEIGHT_SYNC, NAME, server_name  # noqa: E402
from runtime.verl.rollout.engine import GenerationEngine, GenRequest  # noqa: E402
from runtime.verl.rollout.sampling import RowParams  # noqa: E402

PROMPTS = [[5, 9, 13, 200], [7, 1, 2, 3, 4, 8, 40, 41], [60, 61], [11, 12, 13, 14, 15], [300, 301, 302]]
GREEDY = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def _build(path: Path, seed: int) -> Path:
    from runtime.models.tiny import build_tiny_qwen2

    return build_tiny_qwen2(path, seed=seed, tokenizer_corpus_rows=200)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rollout_models")
    return _build(root / "a", 0), _build(root / "b", 1)


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rollout_config(**kw):
    from verl.workers.config import RolloutConfig

    base = dict(name=NAME, tensor_model_parallel_size=1, prompt_length=32, response_length=16, max_num_seqs=64)
    base.update(kw)
    return RolloutConfig(**base)


def _local(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    eng = GenerationEngine.load(str(model_dir), device="cpu", dtype=torch.float32)
    reqs = [GenRequest(prompt_ids=p, max_tokens=n, params=RowParams(temperature=0)) for p in prompts]
    return [r.token_ids for r in eng.generate(reqs)]


async def _launch(model_dir: Path):
    from omegaconf import OmegaConf

    from runtime.verl.rollout.replica import TransformersReplica

    replica = TransformersReplica(
        replica_rank=0, config=_rollout_config(), model_config=OmegaConf.create({"path": str(model_dir)}),
        gpus_per_node=1,
    )
    await replica.launch_servers()
    return replica


def test_server_batches_concurrent_requests_and_syncs_weights(models, ray_session) -> None:
    model_a, model_b = models

    async def scenario() -> None:
        replica = await _launch(model_a)
        server = replica.server_handle
        assert ray.get_actor(server_name(0)) is not None and replica.server_address == server_name(0)

        outs = await asyncio.gather(*[
            server.generate.remote(prompt_ids=p, sampling_params=dict(GREEDY), request_id=f"r{i}")
            for i, p in enumerate(PROMPTS)
        ])
        stats = await server.stats.remote()
        assert stats["requests"] == len(PROMPTS) and stats["batches"] < len(PROMPTS) and stats["max_batch"] > 1
        assert [o.token_ids for o in outs] == _local(model_a, PROMPTS, 16)
        for o in outs:
            assert o.stop_reason == "completed" and len(o.log_probs) == len(o.token_ids)
            assert all(lp <= 0 for lp in o.log_probs)

        # An explicit budget and stop id are honoured; no logprobs unless asked.
        first = outs[1].token_ids
        params = {"temperature": 0, "max_tokens": 5, "stop_token_ids": [first[2]]}
        short = await server.generate.remote(prompt_ids=PROMPTS[1], sampling_params=params, request_id="s")
        assert short.token_ids == first[: min(5, first.index(first[2]) + 1)] and short.log_probs is None

        # Weight sync through the adapter (what verl's engine worker calls on every rank).
        from verl.workers.config import HFModelConfig

        from runtime.verl.rollout.adapter import TransformersRolloutAdapter

        os.environ.pop(ENV_WEIGHT_SYNC, None)
        adapter = TransformersRolloutAdapter(_rollout_config(), HFModelConfig(path=str(model_b)), None)
        assert adapter.is_leader_rank and adapter.replica_rank == 0
        await adapter.resume(tags=["weights"])
        state_b = GenerationEngine.load(str(model_b), device="cpu", dtype=torch.float32).model.state_dict()
        await adapter.update_weights(((k, v) for k, v in state_b.items()), global_steps=3)
        await adapter.resume(tags=["kv_cache"])
        synced = await asyncio.gather(*[
            server.generate.remote(prompt_ids=p, sampling_params=dict(GREEDY), request_id=f"b{i}")
            for i, p in enumerate(PROMPTS)
        ])
        assert [o.token_ids for o in synced] == _local(model_b, PROMPTS, 16)
        assert all(o.extra_fields["global_steps"] == 3 for o in synced)
        stats = await server.stats.remote()
        assert stats["weight_updates"] == 1

        # With sync switched off every rank still drains the generator, but nothing is pushed.
        os.environ[ENV_WEIGHT_SYNC] = "0"
        try:
            frozen = TransformersRolloutAdapter(_rollout_config(), HFModelConfig(path=str(model_b)), None)
        finally:
            os.environ.pop(ENV_WEIGHT_SYNC, None)
        drained: list[str] = []

        def state_a():
            for k, v in GenerationEngine.load(str(model_a), device="cpu", dtype=torch.float32).model.state_dict().items():
                drained.append(k)
                yield k, v

        await frozen.update_weights(state_a(), global_steps=4)
        assert drained and (await server.stats.remote())["weight_updates"] == 1
        still_b = await server.generate.remote(prompt_ids=PROMPTS[0], sampling_params=dict(GREEDY), request_id="c")
        assert still_b.token_ids == synced[0].token_ids and still_b.extra_fields["global_steps"] == 4

        # A non-leader rank drains and never talks to the server.
        os.environ["RANK"] = "1"
        try:
            follower = TransformersRolloutAdapter(_rollout_config(tensor_model_parallel_size=2),
                                                  HFModelConfig(path=str(model_b)), None)
        finally:
            os.environ.pop("RANK")
        assert not follower.is_leader_rank and follower.replica_rank == 0

        # Sleep / wake-up as the trainer does around training (no-ops on CPU, must not fail).
        await replica.sleep()
        await replica.wake_up()
        ray.kill(server)

    asyncio.run(scenario())


def test_abort_returns_aborted_and_resume_serves_again(models, ray_session) -> None:
    model_a, _ = models

    async def scenario() -> None:
        replica = await _launch(model_a)
        server = replica.server_handle
        long = {"temperature": 1.0, "max_tokens": 2000}
        running = server.generate.remote(prompt_ids=PROMPTS[0], sampling_params=long, request_id="long")
        await asyncio.sleep(0.5)
        await replica.abort_all_requests()
        out = await running
        assert out.stop_reason == "aborted" and len(out.token_ids) < 2000
        # A request after abort (not rejected) waits for resume_generation, then runs.
        parked = server.generate.remote(prompt_ids=PROMPTS[2], sampling_params=dict(GREEDY), request_id="p")
        done, _ = await asyncio.wait([asyncio.ensure_future(parked)], timeout=0.5)
        assert not done
        await replica.resume_generation()
        out = await parked
        assert out.stop_reason == "completed" and len(out.token_ids) > 0
        # reject mode answers at once with an aborted empty output
        await server.abort_all_requests.remote(reject_request=True)
        out = await server.generate.remote(prompt_ids=PROMPTS[2], sampling_params=dict(GREEDY), request_id="x")
        assert out.stop_reason == "aborted" and out.token_ids == []
        await server.resume_generation.remote()
        ray.kill(server)

    asyncio.run(scenario())
