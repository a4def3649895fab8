"""Generate bench/corpus/sandbox_load.jsonl: recipe-like programs for bench/sandbox_load.py.

    python bench/make_sandbox_corpus.py        # rewrites the corpus (deterministic: same file every time)

What a model writes in ReTool's RL rollouts, in kinds: sympy algebra, numpy numerics, plain
loops, printing (many lines, output over the sandbox's cap, a set whose order depends on the
hash seed), errors (exceptions, exit codes, syntax errors, memory over the limit) and programs
that run into their time limit. Each is written as a model would (a trailing expression is
printed by the recipe's rule: `runtime.verl.recipe.code.prepare_code`), and every one has one
right answer: seeded randomness only, no clocks, no addresses in the output. The regular
programs take well under a second alone and get 5 s; the time-limit ones loop forever and get
2 s, so load cannot move a program across its limit.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.verl.recipe.code import prepare_code  # noqa: E402

CORPUS = REPO / "bench" / "corpus" / "sandbox_load.jsonl"
RUN_TIMEOUT_S = 5.0
TIME_LIMIT_S = 2.0


def sympy_programs(rng: random.Random) -> list[str]:
    out = []
    for n in rng.sample(range(4, 30), 6):
        out.append(f"import sympy as sp\nx = sp.symbols('x')\nsp.factor(x**{n} - 1)")
    for _ in range(6):
        a, b, c = rng.randint(1, 9), rng.randint(-20, 20), rng.randint(-30, 30)
        out.append(f"from sympy import symbols, solve\nx = symbols('x')\nsolve({a}*x**2 + ({b})*x + ({c}), x)")
    for _ in range(5):
        p = rng.randint(2, 7)
        out.append(f"from sympy import integrate, symbols\nt = symbols('t')\nintegrate(t**{p}*(1 - t)**2 + {p}*t, (t, 0, 1))")
    for _ in range(5):
        n = rng.randint(10**9, 10**12)
        out.append(f"import sympy\nprint(sympy.isprime({n}), sympy.nextprime({n}), sympy.factorint({n}))")
    for _ in range(4):
        k = rng.randint(20, 60)
        out.append(f"from sympy import Rational, binomial\ns = sum(Rational(1, i*(i+1)) for i in range(1, {k}))\nprint(s, binomial({k}, {k // 3}))")
    for _ in range(4):
        n = rng.randint(3, 8)
        out.append(f"import sympy as sp\nx = sp.symbols('x')\nsp.series(sp.cos(x)**{n}, x, 0, 8)")
    return out


def numpy_programs(rng: random.Random) -> list[str]:
    out = []
    for seed in rng.sample(range(1000), 8):
        n = rng.randint(40, 150)
        out.append(
            f"import numpy as np\na = np.random.default_rng({seed}).random(({n}, {n}))\n"
            "w = np.linalg.eigvalsh(a @ a.T)\nprint(round(float(w.max()), 4), round(float(w.min()), 8) >= 0)"
        )
    for seed in rng.sample(range(1000), 6):
        out.append(
            f"import numpy as np\nrng = np.random.default_rng({seed})\nA = rng.integers(-9, 9, (6, 6)).astype(float) + 20*np.eye(6)\n"
            "b = rng.integers(0, 9, 6).astype(float)\nx = np.linalg.solve(A, b)\nnp.round(x, 6).tolist()"
        )
    for seed in rng.sample(range(1000), 6):
        out.append(
            f"import numpy as np\nv = np.random.default_rng({seed}).normal(size=100000)\n"
            "print(f'{v.mean():.3f} {v.std():.3f} {np.percentile(v, 90):.3f}')"
        )
    for n in rng.sample(range(8, 64), 4):
        out.append(f"import numpy as np\nf = np.fft.fft(np.arange({n}) % 5)\nround(float(np.abs(f).sum()), 6)")
    return out


def loop_programs(rng: random.Random) -> list[str]:
    out = []
    for _ in range(6):
        n = rng.randint(10**5, 10**6)
        out.append(f"total = 0\nfor i in range({n}):\n    if i % 3 == 0 or i % 5 == 0:\n        total += i\ntotal")
    for _ in range(5):
        n = rng.randint(10**4, 2 * 10**5)
        out.append(
            f"N = {n}\nsieve = bytearray([1]) * (N + 1)\nsieve[0:2] = b'\\x00\\x00'\n"
            "for i in range(2, int(N**0.5) + 1):\n    if sieve[i]:\n        sieve[i*i::i] = bytearray(len(sieve[i*i::i]))\n"
            "print(sum(sieve))"
        )
    for _ in range(5):
        n = rng.randint(1000, 8000)
        out.append(
            "def steps(n):\n    k = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n        k += 1\n    return k\n"
            f"max(range(1, {n}), key=steps)"
        )
    for _ in range(5):
        n, m = rng.randint(6, 11), rng.randint(2, 4)
        out.append(
            f"from itertools import combinations, permutations\n"
            f"c = sum(1 for p in permutations(range({n}), {m}) if sum(p) % 7 == 0)\n"
            f"d = sum(1 for q in combinations(range(3 * {n}), 3) if sum(q) % 11 == 0)\nprint(c, d)"
        )
    for _ in range(4):
        n = rng.randint(500, 5000)
        out.append(f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, (a + b) % 1000000007\na")
    return out


def print_programs(rng: random.Random) -> list[str]:
    out = []
    for _ in range(4):
        n = rng.randint(50, 400)
        out.append(f"for i in range({n}):\n    print(i, i * i, sep='\\t')")
    out.append("print('x' * 100000)")  # over the 64 KiB cap: cut with the marker, the same every time
    out.append("import sys\nsys.stdout.write('no newline at the end')")
    out.append("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nprint('again')")
    out.append("words = {'apple', 'banana', 'cherry', 'date', 'elderberry'}\nprint(sorted(words))\nprint(words)")  # set order: the hash seed
    out.append("print('unicode: \\u00e9\\u00e8 \\u4e2d\\u6587 \\U0001f600')")
    out.append("print()")
    out.append("")
    return out


def error_programs(rng: random.Random) -> list[str]:
    return [
        "x = 1\ny = 0\nprint('before')\nx / y",
        "print(undefined_name)",
        "values = [1, 2, 3]\nvalues[10]",
        "def f(:\n    pass",
        "raise ValueError('the answer is not an integer')",
        "import sys\nprint('partial')\nsys.exit(3)",
        "assert 2 + 2 == 5, 'arithmetic'",
        "def f(n):\n    return f(n + 1)\nf(0)",
        "import numpy as np\nnp.ones((1 << 31,), dtype=np.uint8).sum()",  # 2 GiB: over the 1 GiB limit
        "import sympy\nsympy.Integer(1) / sympy.Integer(0) + sympy.Symbol('q') + int('seven')",
        "import json\njson.loads('{bad json}')",
        *[f"n = {rng.randint(2, 9)}\nprint([1 // (k - n) for k in range(10)])" for _ in range(3)],
    ]


def time_limit_programs() -> list[str]:
    # Each ends in an expression, as a model's code does: the recipe prints it (never reached).
    return [
        "n = 0\nwhile True:\n    n += 1\nn",
        "print('started', flush=True)\nk = 1\nwhile k > 0:\n    k = (k * 3) % 1000003 + 1\nk",
        "import time\ntime.sleep(100)",
        "total = 0\nfor i in range(10**12):\n    total += i\ntotal",
        "import sympy as sp\nx = sp.symbols('x')\nprint('searching', flush=True)\nk = 2\nwhile sp.factor(x**k - 1) is not None:\n    k += 1\nk",
        "import itertools\nfound = next(p for p in itertools.count() if p < 0)\nfound",
    ]


def build() -> list[dict[str, object]]:
    rng = random.Random(20261207)
    kinds = {
        "sympy": sympy_programs(rng), "numpy": numpy_programs(rng), "loops": loop_programs(rng),
        "prints": print_programs(rng), "errors": error_programs(rng),
    }
    rows: list[dict[str, object]] = []
    for kind, programs in kinds.items():
        for i, code in enumerate(programs):
            rows.append({"id": f"{kind}-{i:02d}", "kind": kind, "run_timeout": RUN_TIMEOUT_S, "code": prepare_code(code)})
    for i, code in enumerate(time_limit_programs()):
        rows.append({"id": f"timeouts-{i:02d}", "kind": "timeouts", "run_timeout": TIME_LIMIT_S, "code": prepare_code(code)})
    return rows


def main() -> None:
    rows = build()
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    print(f"{len(rows)} programs -> {CORPUS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
