"""Per-dataset metrics over graded samples (pure: no torch).

With n samples per problem and c of them correct:

- mean@n: the average accuracy, mean over problems of c / n;
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), averaged
  over problems, for k = 1, 2, 4, ... <= n (pass@1 equals mean@n);
- maj@n: a problem counts when the most frequent extracted answer among its n samples is
  correct (samples without an answer do not vote; a tie goes to the answer seen first,
  so the result does not depend on dict order; no answer at all counts as wrong);
- mean tool calls, mean response length (tokens after the prompt, tool output included)
  and the share of responses cut at max_response_length.

Only the first n samples of each problem count (`n` is the spec's `samples`): a run that
once drew more keeps them on disk but reports what the spec asks for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from runtime.eval.samples import Sample


class DatasetMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    dataset: str
    problems: int
    samples_per_problem: int
    mean_at_n: float = Field(description="Average accuracy over all samples (mean@n).")
    pass_at_k: dict[str, float] = Field(description="Unbiased pass@k by k (keys are k as text: JSON objects).")
    maj_at_n: float = Field(description="Majority-vote accuracy (maj@n).")
    mean_tool_calls: float
    mean_response_tokens: float
    truncated_share: float

    def metric(self, name: str) -> float | None:
        """A metric by the name `expect:` blocks and the report use: `mean@n` (or
        `mean@<n>`), `pass@<k>`, `maj@n`, `tool_calls`, `response_length`, `truncated`."""
        base, _, arg = name.partition("@")
        if base == "mean" and arg in ("n", str(self.samples_per_problem)):
            return self.mean_at_n
        if base == "maj" and arg in ("n", str(self.samples_per_problem)):
            return self.maj_at_n
        if base == "pass":
            return self.pass_at_k.get(arg)
        return {
            "tool_calls": self.mean_tool_calls, "response_length": self.mean_response_tokens,
            "truncated": self.truncated_share,
        }.get(name)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of
    them correct) is correct: 1 - C(n-c, k) / C(n, k), as a stable running product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n."""
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def majority(answers: Iterable[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first."""
    votes = [a for a in answers if a]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


def dataset_metrics(dataset: str, samples: Iterable[Sample], n: int) -> DatasetMetrics:
    """Metrics of one dataset over the first `n` samples of each problem. Every problem
    must have n samples (the runner draws them before it summarises)."""
    by_problem: dict[int, list[Sample]] = {}
    for s in samples:
        if s.dataset == dataset and s.sample < n:
            by_problem.setdefault(s.problem, []).append(s)
    if not by_problem:
        raise ValueError(f"no samples for dataset {dataset!r}")
    short = sorted(p for p, items in by_problem.items() if len(items) != n)
    if short:
        raise ValueError(f"dataset {dataset!r}: problems {short[:5]} do not have {n} samples each")
    ks = ks_for(n)
    mean, maj = 0.0, 0.0
    passes = dict.fromkeys(ks, 0.0)
    flat: list[Sample] = []
    for items in by_problem.values():
        items.sort(key=lambda s: s.sample)
        c = sum(s.correct for s in items)
        mean += c / n
        for k in ks:
            passes[k] += pass_at_k(n, c, k)
        voted = majority(s.answer for s in items)
        maj += float(voted is not None and any(s.correct and s.answer == voted for s in items))
        flat += items
    problems = len(by_problem)
    return DatasetMetrics(
        dataset=dataset, problems=problems, samples_per_problem=n,
        mean_at_n=mean / problems, pass_at_k={str(k): v / problems for k, v in passes.items()},
        maj_at_n=maj / problems,
        mean_tool_calls=sum(s.tool_calls for s in flat) / len(flat),
        mean_response_tokens=sum(s.response_tokens for s in flat) / len(flat),
        truncated_share=sum(s.truncated for s in flat) / len(flat),
    )
