"""General math-English text for the tiny tokenizer, so that prompts beyond the builtin
problems (AIME, DAPO) still tokenize into words rather than single bytes.

Self-contained and seeded: sentences are random arrangements of common words of
competition-math problems and LaTeX commands, which is all a BPE needs to learn merges.
"""

from __future__ import annotations

import random

WORDS: tuple[str, ...] = tuple(
    """
    a an the of and or to in on at by for with from as is are be was were that this these those which
    what when where who how many much find compute determine let suppose given if then there each every
    all some any no not only both either neither than more less most least greater smaller larger equal
    equals number numbers integer integers positive negative real rational prime primes digit digits
    sum product difference quotient remainder divisor divisors divisible multiple multiples factor
    factors sequence series term terms first second third last next previous value values possible
    minimum maximum largest smallest distinct different same ordered pairs pair set sets subset subsets
    element elements function functions polynomial polynomials root roots coefficient coefficients
    equation equations solution solutions solve variable variables expression fraction fractions
    relatively written form where m n p q r s t k x y z triangle triangles circle circles square squares
    rectangle polygon hexagon side sides angle angles length lengths area volume radius diameter center
    point points line lines segment segments plane tangent perimeter height base right acute obtuse
    isosceles equilateral inscribed circumscribed parallel perpendicular intersect intersects
    intersection midpoint vertex vertices edge edges face faces cube sphere cylinder cone coordinate
    coordinates probability random chosen uniformly independently expected ways arrangements
    permutations combinations choose selected balls boxes red blue green white black cards coins dice
    players game games wins win loses round rounds time minutes hours speed walk walks distance miles
    kilometers shop coffee grid rows columns cells table path paths step steps move moves
    modulo mod base logarithm log sine cosine exponent power powers consecutive odd even units
    tens hundreds thousands greatest common divisor least common multiple floor ceiling absolute
    """.split()
)

LATEX: tuple[str, ...] = (
    "$x$", "$n$", "$m+n$", "$\\frac{m}{n}$", "$\\frac{1}{2}$", "$\\sqrt{2}$", "$\\sqrt{3}$", "$x^2$", "$a_n$",
    "$\\log_2 x$", "$\\triangle ABC$", "$AB = 5$", "$BC$", "$\\angle A$", "$\\pi$", "$\\omega$", "$\\cdot$",
    "$\\le$", "$\\ge$", "$\\neq$", "$\\{1, 2, 3\\}$", "$(x, y)$", "$1000$", "$\\dfrac{p}{q}$", "$\\binom{n}{k}$",
    "$2^{10}$", "$f(x)$", "$\\sum_{k=1}^{n} k$", "$\\overline{AB}$", "$\\mathcal{S}$", "$\\tan \\theta$",
)


def sentences(n: int, seed: int) -> list[str]:
    """`n` pseudo-sentences mixing common math words, numbers and LaTeX snippets."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        parts: list[str] = []
        for _ in range(rng.randint(8, 24)):
            roll = rng.random()
            if roll < 0.12:
                parts.append(rng.choice(LATEX))
            elif roll < 0.2:
                parts.append(str(rng.randint(0, 2025)))
            else:
                parts.append(rng.choice(WORDS))
        text = " ".join(parts)
        out.append(text[0].upper() + text[1:] + rng.choice((".", "?", ".", ",")))
    return out
