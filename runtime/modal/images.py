"""The Modal image chain for a spec's `image`, and what it cannot build.

A training image must never compile anything: `flash-attn` has no wheel on the package
index and its source package imports torch in `setup.py`, so an isolated `pip`/`uv` build
fails (and with torch present it compiles CUDA for an hour). The 7B spec therefore starts
from verl's published application image, which carries torch, vLLM, flash-attn, apex and
TransformerEngine, and adds only pure-Python packages on top.

Facts about known base images live in `KNOWN_BASES` (each with its source). For a known
base the chain:
- uses the image's own Python (no `add_python`: a second interpreter would not see the
  image's packages), made the `python` on PATH by the first step, since Modal's pip steps
  install with whatever `python` is;
- skips a pip entry the image already provides at the pinned version;
- installs the image's framework (verl) pinned, with `--no-deps`, extras dropped: its
  dependencies are what the image was built with;
- lets uv install into the image's system Python (PEP 668 marks it externally managed).
Everything else is installed as written, and retool's own packages come last
(`add_local_python_source`: Modal refuses build steps after a non-copied local source).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from reconciler.spec import Image
from runtime.modal.models import ImageOp, ImageStep

LOCAL_SOURCE_IGNORE = ("**/__pycache__", "**/*.pyc", "**/.pytest_cache")
ANY_VERSION = "*"


class BaseImage(BaseModel):
    """What a published base image already contains."""

    model_config = ConfigDict(frozen=True)

    python: str  # its own interpreter (first `python` on PATH)
    externally_managed: bool = False  # PEP 668: uv needs --break-system-packages (pip reads the image's env)
    provides: dict[str, str] = Field(default_factory=dict)  # normalised name -> version (ANY_VERSION: built from git)
    no_deps: tuple[str, ...] = ()  # installed with --no-deps on this image (its deps are the image's)
    source: str = ""


# verl's vLLM application image for verl 0.9.x: docker/Dockerfile.stable.vllm ("Target:
# verlai/verl:vllm024.dev2"; nvidia/cuda 13.0.2 devel, Ubuntu 24.04, system Python 3.12 with
# PIP_BREAK_SYSTEM_PACKAGES=1), the image verl v0.9.0's GPU CI runs on (.github/workflows/vllm.yml
# IMAGE verlai/verl:vllm024.dev2). It installs verl's dependencies then uninstalls verl itself.
VERL_VLLM_024 = "verlai/verl:vllm024.dev2"
KNOWN_BASES: dict[str, BaseImage] = {
    VERL_VLLM_024: BaseImage(
        python="3.12", externally_managed=True,
        provides={
            "torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "vllm": "0.24.0",
            "flash-attn": "2.8.3", "transformers": "5.3.0", "trl": "0.27.0", "transferqueue": "0.1.8",
            "apex": ANY_VERSION, "transformer-engine": "2.16.1", "megatron-core": ANY_VERSION,
            "megatron-bridge": ANY_VERSION, "deep-ep": ANY_VERSION, "flash-mla": ANY_VERSION,
            "fast-hadamard-transform": ANY_VERSION, "liger-kernel": ANY_VERSION,
        },
        no_deps=("verl",),
        source="verl-project/verl docker/Dockerfile.stable.vllm @ v0.9.0",
    ),
}

# Packages with no wheel on the package index for current torch/CUDA: pip builds them from
# source (CUDA toolchain, torch importable at build time, often an hour).
NEEDS_COMPILATION: dict[str, str] = {
    "flash-attn": "flash-attn", "apex": "apex", "transformer-engine": "TransformerEngine",
    "deep-ep": "DeepEP", "flash-mla": "FlashMLA", "fast-hadamard-transform": "fast-hadamard-transform",
    "causal-conv1d": "causal-conv1d", "mamba-ssm": "mamba-ssm", "grouped-gemm": "grouped_gemm",
}

_REQ_RE = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;@]*)")
_DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
_MUTABLE_TAGS = {"latest", "stable", "nightly", "edge", "main", "master", "dev", "devel", "rolling"}


class Requirement(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    name: str  # normalised (PEP 503): lower case, runs of -_. as one -
    pinned: str | None  # the version after `==`, when exactly pinned


def parse_requirement(text: str) -> Requirement | None:
    """A pip requirement's name and exact pin; None for options, URLs and paths."""
    if text.strip().startswith(("-", "git+", "http://", "https://", "/", ".")):
        return None
    m = _REQ_RE.match(text)
    if not m:
        return None
    spec = m.group("spec").strip()
    pinned = spec[2:].strip() if spec.startswith("==") and "," not in spec else None
    return Requirement(text=text, name=normalise(m.group("name")), pinned=pinned)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_facts(base: str) -> BaseImage | None:
    """Facts about a known base image (by its tag, with or without a digest)."""
    return KNOWN_BASES.get(base.split("@", 1)[0])


def _provided(facts: BaseImage | None, req: Requirement) -> bool:
    if facts is None or req.name not in facts.provides:
        return False
    have = facts.provides[req.name]
    return req.pinned is None or have == ANY_VERSION or have == req.pinned


# --------------------------------------------------------------------------- the chain


def image_steps(image: Image, *, apt_extra: tuple[str, ...] = ()) -> list[ImageStep]:
    """The image chain, in Modal's required order, local sources last; `apt_extra` are system
    packages a function option needs (EFA's libraries)."""
    facts = base_facts(image.base)
    options = {} if facts is not None else {"add_python": image.python}
    steps = [ImageStep(op="from_registry", args=[image.base], options=options)]
    if facts is not None:
        steps.append(ImageStep(op="run_commands", args=[pin_python_command(facts.python)]))
    apt = list(dict.fromkeys([*image.apt, *apt_extra]))
    if apt:
        steps.append(ImageStep(op="apt_install", args=apt))
    if image.env:
        steps.append(ImageStep(op="env", env=dict(sorted(image.env.items()))))
    plain, no_deps = _split_pip(image, facts)
    op: ImageOp = "uv_pip_install" if image.installer == "uv" else "pip_install"
    extra = "--break-system-packages" if facts is not None and facts.externally_managed and op == "uv_pip_install" else ""
    if plain:
        steps.append(ImageStep(op=op, args=plain, options={"extra_options": extra} if extra else {}))
    if no_deps:
        steps.append(ImageStep(op=op, args=no_deps, options={"extra_options": " ".join(filter(None, ["--no-deps", extra]))}))
    if image.commands:
        steps.append(ImageStep(op="run_commands", args=list(image.commands)))
    if image.local_sources:
        # Ship package data too (the RL tool config, chat templates): Modal's default ignores non-.py files.
        steps.append(ImageStep(op="add_local_python_source", args=list(image.local_sources),
                               options={"ignore": list(LOCAL_SOURCE_IGNORE)}))
    return steps


def pin_python_command(version: str) -> str:
    """A build step that makes `python` the base image's own interpreter. modal 1.6.4's
    `uv_pip_install` installs with `--python $(command -v python)` and `pip_install` runs
    `python -m pip`: on an image whose Python is only `python3.12` (Ubuntu's packages ship no
    `python`), or whose `python` is another interpreter, the install would fail or land where
    the image's torch and vLLM are not. The step fails the build unless `python` is `version`."""
    check = f"import sys; assert sys.version_info[:2] == ({version.replace('.', ', ')}), sys.version"
    return (
        f'if [ "$(python -c \'import sys; print(\"%d.%d\" % sys.version_info[:2])\' 2>/dev/null)" != "{version}" ]; '
        f'then ln -sf "$(command -v python{version})" /usr/local/bin/python; fi && python -c "{check}"'
    )


def _split_pip(image: Image, facts: BaseImage | None) -> tuple[list[str], list[str]]:
    """(entries installed as written, entries installed pinned without dependencies)."""
    plain: list[str] = []
    no_deps: list[str] = []
    for text in image.pip:
        req = parse_requirement(text)
        if req is None or facts is None:
            plain.append(text)
        elif _provided(facts, req):
            continue  # the base image has it already
        elif req.name in facts.no_deps:
            no_deps.append(f"{req.name}=={req.pinned}" if req.pinned else req.name)  # extras' deps are the image's
        else:
            plain.append(text)
    return plain, no_deps


# --------------------------------------------------------------------------- checks


def image_problems(image: Image) -> list[str]:
    """What makes the chain unusable on a known base (plan blocks `image` with it)."""
    facts = base_facts(image.base)
    if facts is None or image.python == facts.python:
        return []
    return [
        f"image.python: {image.base} runs its own Python {facts.python} (its torch, vLLM and flash-attn live "
        f"there); set image.python to {facts.python!r}"
    ]


def image_warnings(image: Image) -> list[str]:
    """Reproducibility and build-time warnings for validate and plan."""
    warnings: list[str] = []
    base = image.base
    if not _DIGEST_RE.search(base):
        tag = base.rsplit("/", 1)[-1].partition(":")[2]
        if not tag:
            warnings.append(f"image.base {base!r} has no tag (means :latest): pin a version tag or @sha256 digest")
        elif tag.lower() in _MUTABLE_TAGS or tag.lower().endswith(".latest") or not re.search(r"\d", tag):
            warnings.append(f"image.base {base!r} uses the mutable tag {tag!r}: pin a version tag or @sha256 digest")
    facts = base_facts(base)
    for text in image.pip:
        req = parse_requirement(text)
        if req is None:
            continue
        if req.pinned is None and "@" not in text:
            warnings.append(f"image.pip {text!r} is not pinned (`==`): the image may change between builds")
        if req.name in NEEDS_COMPILATION and not _provided(facts, req):
            have = facts.provides.get(req.name) if facts else None
            where = f"{base} has {have}" if have else f"{base} does not provide it"
            warnings.append(
                f"image.pip {text!r} has no wheel and compiles from source at build time ({where}): the build needs "
                f"torch and a CUDA toolchain and can take an hour, or fail under build isolation; start from an "
                f"image that provides {NEEDS_COMPILATION[req.name]} (e.g. {VERL_VLLM_024}) instead"
            )
    return warnings
