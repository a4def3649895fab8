"""Small arithmetic and algebra word problems with verifiable integer answers.

The builtin datasets (`builtin:tiny_sft`, `builtin:tiny_math`) and the tool-call check's
held-out prompts all draw from here. The problems are deliberately regular (one fixed phrase
before the call, and code that is always `print(<flat expression>)` with no nested
parentheses) so that a model of a few hundred thousand parameters learns the tool-call
format in minutes of CPU training. Two problem sets (`PROBLEM_SETS`):

- `mixed`: nine word-problem templates. The tiny model learns the format on them but not to
  copy the numbers, so it rarely solves one.
- `fixed_shape`: `What is a op b?` with two-digit operands and a three-digit answer, so every
  digit the model copies (from the problem into its code, from the interpreter's output into
  its answer) sits at the same distance. A randomly initialised tiny model learns that
  copying within a few hundred SFT steps (docs/local.md), so it solves held-out problems.

Held-out problems are disjoint from training problems by construction: a problem belongs
to the held-out bucket when its text hashes into it (`is_heldout`), and the training
generators never emit a held-out-bucket problem, whatever their seed or row count.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

from pydantic import BaseModel, ConfigDict

from reconciler.spec import ProblemSet

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


def _sum_then_product(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 99), rng.randint(2, 20), rng.randint(2, 20)
    return Problem(template="expr", text=f"What is {a} + {b} * {c}?", code=f"print({a} + {b} * {c})", answer=a + b * c)


def _boxes(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    return Problem(
        template="boxes", text=f"A box holds {a} pens. How many pens are in {b} boxes?",
        code=f"print({a} * {b})", answer=a * b,
    )


def _coins(rng: random.Random) -> Problem:
    b = rng.randint(2, 90)
    a = b + rng.randint(1, 400)
    return Problem(
        template="coins", text=f"Sam has {a} coins and spends {b} of them. How many coins are left?",
        code=f"print({a} - {b})", answer=a - b,
    )


def _remainder(rng: random.Random) -> Problem:
    a, b = rng.randint(100, 9999), rng.randint(3, 19)
    return Problem(
        template="remainder", text=f"What is the remainder when {a} is divided by {b}?",
        code=f"print({a} % {b})", answer=a % b,
    )


def _orchard(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    c = rng.randint(1, a * b - 1)
    return Problem(
        template="orchard", text=f"A farm has {a} rows of {b} trees and {c} trees are cut down. How many trees are left?",
        code=f"print({a} * {b} - {c})", answer=a * b - c,
    )


def _linear(rng: random.Random) -> Problem:
    x, b = rng.randint(1, 500), rng.randint(1, 500)
    return Problem(
        template="linear", text=f"Solve for x: x + {b} = {x + b}.", code=f"print({x + b} - {b})", answer=x,
    )


def _scaled(rng: random.Random) -> Problem:
    a, x = rng.randint(2, 19), rng.randint(2, 99)
    return Problem(
        template="scaled", text=f"Solve for x: {a}*x = {a * x}.", code=f"print({a * x} // {a})", answer=x,
    )


def _square(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 99), rng.randint(1, 99)
    return Problem(
        template="square", text=f"What is {a} squared minus {b}?", code=f"print({a} ** 2 - {b})", answer=a * a - b
    )


def _multiples(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 19), rng.randint(50, 999)
    return Problem(
        template="multiples", text=f"How many multiples of {a} are there from 1 to {b}?",
        code=f"print({b} // {a})", answer=b // a,
    )


def _fixed_shape(rng: random.Random) -> Problem:
    while True:
        op = rng.choice("+*")
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        answer = a + b if op == "+" else a * b
        if 100 <= answer <= 999:
            return Problem(template="fixed_shape", text=f"What is {a} {op} {b}?", code=f"print({a} {op} {b})", answer=answer)


Template = Callable[[random.Random], Problem]

TEMPLATES: tuple[Template, ...] = (
    _sum_then_product, _boxes, _coins, _remainder, _orchard, _linear, _scaled, _square, _multiples,
)

# The builtin generators' `problems` option: name -> the templates it draws from.
PROBLEM_SETS: dict[str, tuple[Template, ...]] = {"mixed": TEMPLATES, "fixed_shape": (_fixed_shape,)}


def is_heldout(text: str) -> bool:
    """Whether a problem text is reserved for held-out evaluation (stable across runs)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def generate(n: int, seed: int, *, heldout: bool = False, problems: ProblemSet = "mixed") -> list[Problem]:
    """`n` distinct problems of the set `problems` from the training bucket (or, with
    `heldout`, the held-out bucket)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    out: list[Problem] = []
    seen: set[str] = set()
    # The cap only stops a request for more distinct problems than the set holds
    # (`fixed_shape` has 5,556 in the training bucket and 794 held out, `mixed` millions).
    for attempt, problem in enumerate(_stream(seed, PROBLEM_SETS[problems])):
        if attempt > 100 * n + 10_000:
            raise ValueError(f"could not generate {n} distinct problems")
        if problem.text in seen or is_heldout(problem.text) != heldout:
            continue
        seen.add(problem.text)
        out.append(problem)
        if len(out) == n:
            break
    return out


def _stream(seed: int, templates: tuple[Template, ...]) -> Iterator[Problem]:
    # Templates rotate so every template is equally represented even in tiny sets.
    rng = random.Random(seed)
    order = list(templates)
    while True:
        rng.shuffle(order)
        for make in order:
            yield make(rng)
