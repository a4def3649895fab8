"""Preloading: import the configured modules once, then exercise them so their lazy imports
and one-time set-up happen in the zygote instead of in every execution.

The warm-up computes on a private symbol and clears sympy's result cache afterwards, so a
program gets warm code paths but never a cached answer it did not compute.
"""

from __future__ import annotations

import importlib


def preload(modules: list[str], warm: bool) -> tuple[list[str], dict[str, str]]:
    loaded: list[str] = []
    failures: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # a missing optional module must not stop the sandbox
            failures[name] = f"{type(exc).__name__}: {exc}"
    if warm:
        for name in loaded:
            warmer = _WARMERS.get(name)
            if warmer is not None:
                try:
                    warmer()
                except Exception as exc:
                    failures[f"{name} (warm-up)"] = f"{type(exc).__name__}: {exc}"
    return loaded, failures


def _warm_numpy() -> None:
    import numpy as np

    a = np.arange(16.0).reshape(4, 4) + np.eye(4) * 10
    np.linalg.eigvalsh(a @ a.T)
    np.linalg.solve(a, np.ones(4))
    np.fft.fft(np.ones(8))
    np.random.default_rng(0).random(4)
    np.random.seed()  # first reseed does one-time set-up; every execution reseeds


def _warm_sympy() -> None:
    import sympy
    from sympy.core.cache import clear_cache

    t = sympy.Symbol("_retool_warmup")
    sympy.factor(t**4 - 1)
    sympy.expand((t + 1) ** 3)
    sympy.simplify(sympy.sin(t) ** 2 + sympy.cos(t) ** 2)
    sympy.solve(t**2 - 2, t)
    sympy.integrate(t**2, t)
    sympy.nsimplify(sympy.Rational(1, 3) + sympy.sqrt(2))
    sympy.isprime(97)
    clear_cache()


_WARMERS = {"numpy": _warm_numpy, "sympy": _warm_sympy}
