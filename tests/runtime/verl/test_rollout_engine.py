"""The transformers generation engine on a random tiny Qwen2 (no Ray): on CPU, and on CUDA
too where a GPU is present (the same rollout serves GPU machines without vLLM)."""

from __future__ import annotations

import pytest
import torch

from runtime.verl.rollout.engine import GenerationEngine, GenRequest, default_dtype
from runtime.verl.rollout.sampling import BatchParams, RowParams, apply_repetition_penalty, choose_next, filter_top_k_top_p

VOCAB = 97
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(device: str) -> GenerationEngine:
    return GenerationEngine(tiny_model(0).to(device), eos_ids=[], pad_id=0, device=device, seed=0)


PROMPTS = [[5, 9, 13], [7, 1, 2, 3, 4, 8, 40, 41], [60], [11, 12, 13, 14, 15]]


def greedy(prompt: list[int], n: int, **kw) -> GenRequest:
    return GenRequest(prompt_ids=prompt, max_tokens=n, params=RowParams(temperature=0.0), logprobs=True, **kw)


def test_batched_greedy_equals_one_at_a_time_and_hf_generate(engine: GenerationEngine) -> None:
    batched = engine.generate([greedy(p, 12) for p in PROMPTS])
    for prompt, res in zip(PROMPTS, batched):
        alone = engine.generate([greedy(prompt, 12)])[0]
        assert res.token_ids == alone.token_ids
        assert res.log_probs == pytest.approx(alone.log_probs, abs=1e-5)
        hf = engine.model.generate(torch.tensor([prompt], device=engine.device), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        assert res.token_ids == hf[0, len(prompt):].tolist()
        assert res.finish == "length" and len(res.token_ids) == 12


def test_logprobs_are_what_a_full_forward_pass_gives(engine: GenerationEngine) -> None:
    """The quantity verl's actor recomputes: log_softmax(logits / T) at each sampled token."""
    temp = 0.7
    reqs = [GenRequest(prompt_ids=p, max_tokens=10, params=RowParams(temperature=temp), logprobs=True) for p in PROMPTS]
    for prompt, res in zip(PROMPTS, engine.generate(reqs)):
        seq = torch.tensor([prompt + res.token_ids], device=engine.device)
        with torch.no_grad():
            logits = engine.model(seq).logits[0, len(prompt) - 1:-1].float().cpu() / temp
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(res.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(res.log_probs), expected, atol=1e-5)


def test_stop_tokens_and_budgets(engine: GenerationEngine) -> None:
    first = engine.generate([greedy(PROMPTS[1], 12)])[0].token_ids
    stop_at = first[3]
    res = engine.generate([greedy(PROMPTS[1], 12, stop_ids=frozenset({stop_at})), greedy(PROMPTS[0], 2)])
    assert res[0].finish == "stop" and res[0].token_ids == first[: first.index(stop_at) + 1]
    assert res[1].finish == "length" and len(res[1].token_ids) == 2
    # eos ids of the engine stop every row too
    eos_engine = GenerationEngine(engine.model, eos_ids=[stop_at], pad_id=0, device=engine.device)
    assert eos_engine.generate([greedy(PROMPTS[1], 12)])[0].token_ids[-1] == stop_at


def test_sampling_is_seeded_and_top_k_one_is_greedy(device: str) -> None:
    model = tiny_model(1).to(device)
    reqs = [GenRequest(prompt_ids=p, max_tokens=8, params=RowParams(temperature=1.0)) for p in PROMPTS]
    a = GenerationEngine(model, eos_ids=[], pad_id=0, device=device, seed=3).generate(reqs)
    b = GenerationEngine(model, eos_ids=[], pad_id=0, device=device, seed=3).generate(reqs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    eng = GenerationEngine(model, eos_ids=[], pad_id=0, device=device, seed=4)
    top1 = eng.generate([GenRequest(prompt_ids=p, max_tokens=8, params=RowParams(temperature=1.0, top_k=1)) for p in PROMPTS])
    greedy_res = eng.generate([greedy(p, 8) for p in PROMPTS])
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy_res]
    assert all(r.log_probs is None for r in top1)


def test_abort_stops_a_batch() -> None:
    eng = GenerationEngine(tiny_model(2), eos_ids=[], pad_id=0, device="cpu")
    res = eng.generate([greedy(p, 50) for p in PROMPTS], should_abort=lambda: True)
    assert all(r.finish == "aborted" and len(r.token_ids) == 1 for r in res)


def test_load_weights_makes_it_the_other_model(device: str) -> None:
    eng = GenerationEngine(tiny_model(5).to(device), eos_ids=[], pad_id=0, device=device)
    other = tiny_model(6)  # weights arrive from the actor as host tensors
    before = eng.generate([greedy(p, 10) for p in PROMPTS])
    target = GenerationEngine(other, eos_ids=[], pad_id=0, device="cpu").generate([greedy(p, 10) for p in PROMPTS])
    # (random tied-embedding models tend to repeat the prompt's last token: compare log-probs)
    gap = max(abs(x - y) for b, t in zip(before, target) for x, y in zip(b.log_probs, t.log_probs))
    assert gap > 1e-3
    # The actor sends tied aliases too (lm_head.weight = embed_tokens.weight): both accepted.
    n = eng.load_weights((k, v.clone()) for k, v in other.state_dict().items())
    assert n == len(other.state_dict())
    after = eng.generate([greedy(p, 10) for p in PROMPTS])
    assert [r.token_ids for r in after] == [r.token_ids for r in target]
    for a, t in zip(after, target):
        assert a.log_probs == pytest.approx(t.log_probs, abs=1e-4 if device == "cuda" else 1e-6)


def test_offload_between_rollouts_keeps_results(device: str) -> None:
    eng = GenerationEngine(tiny_model(9).to(device), eos_ids=[], pad_id=0, device=device)
    first = eng.generate([greedy(p, 6) for p in PROMPTS])
    eng.offload()  # what the server does when verl puts the rollout to sleep
    assert next(eng.model.parameters()).device.type == "cpu"
    eng.onload()
    assert next(eng.model.parameters()).device.type == device
    eng.offload()
    again = eng.generate([greedy(p, 6) for p in PROMPTS])  # a request wakes it up by itself
    assert [r.token_ids for r in again] == [r.token_ids for r in first]


def test_default_dtype() -> None:
    assert default_dtype("cpu", "bfloat16") == torch.float32
    assert default_dtype("cuda", "bfloat16") == torch.bfloat16 and default_dtype("cuda", "float16") == torch.float16


def test_load_weights_rejects_unknown_and_partial_updates() -> None:
    eng = GenerationEngine(tiny_model(7), eos_ids=[], pad_id=0, device="cpu")
    state = tiny_model(8).state_dict()
    with pytest.raises(KeyError, match="no counterpart"):
        eng.load_weights([("model.not_a_layer.weight", torch.zeros(1))])
    partial = [(k, v) for k, v in state.items() if "layers.1." not in k]
    with pytest.raises(KeyError, match="stale"):
        eng.load_weights(partial)


def test_top_k_top_p_filter() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    out = filter_top_k_top_p(logits, top_k=torch.tensor([2, 0, 0]), top_p=torch.tensor([1.0, 0.7, 1.0]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept[2].tolist() == [True, True, True, True]  # no filter
    tiny_p = filter_top_k_top_p(logits, top_k=torch.tensor([0, 0, 0]), top_p=torch.tensor([1e-6] * 3))
    assert torch.isfinite(tiny_p).sum(1).tolist() == [1, 1, 1]


def test_repetition_penalty_and_mixed_rows() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False], [True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]
    params = BatchParams.of([RowParams(temperature=0.0), RowParams(temperature=1.0, top_k=1)], torch.device("cpu"))
    chosen, lp = choose_next(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]]), params, None, None)
    assert chosen.tolist() == [1, 0]
    assert lp[0].item() == pytest.approx(torch.log_softmax(torch.tensor([0.0, 3.0, 1.0]), 0)[1].item())


def test_row_params_from_verl_sampling_dict() -> None:
    p = RowParams.from_dict({"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True})
    assert p.greedy and p.top_k == -1
    assert RowParams.from_dict({"temperature": 1.0, "top_p": 0.6}).top_p == 0.6
