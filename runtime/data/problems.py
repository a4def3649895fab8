"""Small arithmetic problems with verifiable integer answers, made to be solved with the tool.

The builtin datasets (`builtin:tiny_sft`, `builtin:tiny_math`) and the tool-call check's
held-out prompts all draw from here. The problems are deliberately regular (a handful of
templates, one fixed phrase before the call, and code that is always `print(<the flat
expression the problem states>)` with no parentheses inside) so that a model of a few
hundred thousand parameters learns to use the tool in minutes of CPU training.

Held-out problems are disjoint from training problems by construction: a problem belongs
to the held-out bucket when its text hashes into it (`is_heldout`), and the training
generators never emit a held-out-bucket problem, whatever their seed or row count.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

from pydantic import BaseModel, ConfigDict

# One in HELDOUT_MODULUS problems (by text hash) is reserved for held-out evaluation.
HELDOUT_MODULUS = 8

# The fixed phrase the assistant says before every tool call in generated SFT data.
CALL_PHRASE = "Let me compute this with code."


class Problem(BaseModel):
    """One generated problem: its text, the code that solves it and the integer answer."""

    model_config = ConfigDict(frozen=True)

    template: str
    text: str
    code: str
    answer: int


# Each problem states its computation as a flat Python expression, asked in one of a few
# phrasings; the solution's code prints exactly that expression. A tiny model can learn to
# copy the expression into the call and the printed result into `\boxed{}` in minutes of
# CPU training, while the result itself (products and remainders of 3-4 digit numbers) is
# beyond what it could compute or memorise: it solves these with the tool or not at all.
PHRASINGS: tuple[str, ...] = ("Compute {}.",)


def _problem(rng: random.Random, template: str, expression: str, answer: int) -> Problem:
    text = rng.choice(PHRASINGS).format(expression)
    return Problem(template=template, text=text, code=f"print({expression})", answer=answer)


def _sum(rng: random.Random) -> Problem:
    b = rng.randint(100, 999)
    a = rng.randint(1000, 9999 - b)
    return _problem(rng, "sum", f"{a} + {b}", a + b)


def _difference(rng: random.Random) -> Problem:
    b = rng.randint(100, 999)
    a = rng.randint(1000 + b, 9999)
    return _problem(rng, "difference", f"{a} - {b}", a - b)


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (_sum, _difference)


def is_heldout(text: str) -> bool:
    """Whether a problem text is reserved for held-out evaluation (stable across runs)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def generate(n: int, seed: int, *, heldout: bool = False) -> list[Problem]:
    """`n` distinct problems from the training bucket (or, with `heldout`, the held-out bucket)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    out: list[Problem] = []
    seen: set[str] = set()
    # The problem space holds millions of texts; the cap only stops a runaway request.
    for attempt, problem in enumerate(_stream(seed)):
        if attempt > 100 * n + 10_000:
            raise ValueError(f"could not generate {n} distinct problems")
        if problem.text in seen or is_heldout(problem.text) != heldout:
            continue
        seen.add(problem.text)
        out.append(problem)
        if len(out) == n:
            break
    return out


def _stream(seed: int) -> Iterator[Problem]:
    # Templates rotate so every template is equally represented even in tiny sets.
    rng = random.Random(seed)
    order = list(TEMPLATES)
    while True:
        rng.shuffle(order)
        for make in order:
            yield make(rng)
