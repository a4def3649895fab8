"""The layering contracts in pyproject.toml cover the whole core: a new module in
reconciler/ (outside the CLI) is checked by import-linter from the day it is added."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE_CONTRACT = "The reconciler core imports no backend, no sandbox and no CLI"


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_every_core_module_is_a_source_of_the_core_contract() -> None:
    listed = set(_contracts()[CORE_CONTRACT]["source_modules"])
    package = REPO / "reconciler"
    found = {
        "reconciler." + (p.stem if p.is_file() else p.name)
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert found - {"reconciler.cli"} == listed


def test_the_contracts_name_the_heavy_packages_the_readme_promises() -> None:
    heavy = _contracts()["The reconciler (core and CLI) never imports torch, verl, ray, modal or transformers"]
    assert {"torch", "verl", "ray", "modal", "transformers"} <= set(heavy["forbidden_modules"])
    assert heavy["source_modules"] == ["reconciler"]
