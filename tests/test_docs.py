"""The README is a front page and docs/ holds the reference: the README still opens with
its two commands, lists every page under docs/, and no link in either points nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

SETUP = ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt "
         "-e '.[train,test,modal,vllm]' && pip uninstall -y torchvision torchaudio torchcodec "
         "&& retool apply specs/retool-tiny.yaml --yes")
TESTS = ". .venv/bin/activate && python -m pytest -q"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without code blocks and code spans (links inside them are not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*)$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_readme_opens_with_its_two_commands() -> None:
    head = (REPO / "README.md").read_text(encoding="utf-8").split("\n")[:10]
    assert head == ["# retool", "", "```bash", SETUP, "```", "", "```bash", TESTS, "```", ""]
    # CI runs the README's test command (.ci/run says so and does it).
    assert TESTS.split(" && ")[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_lists_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Documentation\n", 1)
    assert len(section) == 2, "the README has no '## Documentation' section"
    listed = set(re.findall(r"\]\(docs/([^)#]+\.md)\)", section[1].split("\n## ", 1)[0]))
    present = {p.name for p in DOCS.glob("*.md")}
    assert present - listed == set(), "docs pages missing from the README's Documentation section"
    assert listed - present == set(), "the README's Documentation section lists pages that do not exist"


def test_every_relative_link_resolves() -> None:
    broken: list[str] = []
    for page in pages():
        for target in _LINK.findall(prose(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


# Notes that once lived outside the repository; the design now lives in docs/ and nothing
# may point at them again. The names are assembled so this file does not cite them itself.
OLD_NOTES = tuple(f"{name}.md" for name in ("STYLE", "RECIPE", "DESIGN", "MODAL"))


def repository_files() -> list[Path]:
    """Every file git would commit (tracked, or new and not ignored); a walk outside git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        return [REPO / name for name in listed if name and (REPO / name).is_file()]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", ".retool", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_no_file_cites_notes_outside_the_repository() -> None:
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in OLD_NOTES) + r")")
    citing = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (docs/report.png)
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                citing.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert citing == [], "cite docs/ instead:\n" + "\n".join(citing)
