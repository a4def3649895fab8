"""YAML parsing that remembers where every value came from.

PyYAML's `compose()` keeps a line/column on every node; we build plain Python data from
the node tree ourselves so that each path (`("stages", "sft", "optim", "lr")`) maps to
the position of its key and of its value, and so that duplicate keys are errors (PyYAML
silently keeps the last one).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

Path = tuple[str | int | float, ...]  # YAML mapping keys may be any plain scalar

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Pos(BaseModel):
    """A 1-based line and column."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.line}:{self.col}"


class YamlProblem(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    pos: Pos
    path: Path = ()
    message: str


class ParsedYaml(BaseModel):
    """Plain data plus, for every path, where its key and its value start."""

    model_config = ConfigDict(arbitrary_types_allowed=True, defer_build=True)

    data: Any = None
    keys: dict[Path, Pos] = {}
    values: dict[Path, Pos] = {}
    problems: list[YamlProblem] = []
    root_pos: Pos = Pos(line=1, col=1)


def _pos(mark: Any) -> Pos:
    return Pos(line=mark.line + 1, col=mark.column + 1)


def _scanner_message(err: yaml.MarkedYAMLError, text: str, pos: Pos) -> str:
    problem = err.problem or str(err)
    lines = text.splitlines()
    line = lines[pos.line - 1] if 0 < pos.line <= len(lines) else ""
    indent = line[: len(line) - len(line.lstrip())]
    if "\t" in indent or line[pos.col - 1 : pos.col] == "\t" or "tab" in problem:
        return "tab character: YAML indentation must use spaces"
    context = f" ({err.context})" if err.context else ""
    return f"invalid YAML: {problem}{context}"


def parse_yaml(text: str) -> ParsedYaml:
    """Parse one YAML document; syntax errors come back as problems, never raised."""
    out = ParsedYaml()
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        if err.context_mark is not None and "end of stream" in (err.problem or ""):
            mark = err.context_mark  # an unclosed quote or bracket: point at where it opened
        pos = _pos(mark) if mark is not None else Pos(line=1, col=1)
        out.problems.append(YamlProblem(pos=pos, message=_scanner_message(err, text, pos)))
        return out
    except yaml.YAMLError as err:  # e.g. more than one document
        out.problems.append(YamlProblem(pos=Pos(line=1, col=1), message=f"invalid YAML: {err}"))
        return out
    if root is None:
        return out
    out.root_pos = _pos(root.start_mark)
    builder = _Builder(out)
    out.data = builder.build(root, ())
    return out


class _Builder:
    def __init__(self, out: ParsedYaml) -> None:
        self.out = out
        self.scalars = _Loader("")  # only its constructor is used, for typed scalars

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.out.values.setdefault(path, _pos(node.start_mark))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            self.out.problems.append(YamlProblem(pos=_pos(node.start_mark), path=path, message=f"invalid value: {err}"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` fills keys not set explicitly
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    value = self.build(src, path)
                    if isinstance(value, dict):
                        merged.update({k: v for k, v in value.items() if k not in merged})
                continue
            key = self.build(key_node, (*path, "<key>"))
            if not isinstance(key, (str, int, float, bool)) or key is None:
                self.out.problems.append(
                    YamlProblem(pos=_pos(key_node.start_mark), path=path, message="mapping keys must be plain scalars")
                )
                continue
            key_path = (*path, key)
            if key in result:
                first = self.out.keys[key_path]
                self.out.problems.append(
                    YamlProblem(
                        pos=_pos(key_node.start_mark), path=key_path,
                        message=f"duplicate key {key!r} (first defined at line {first.line})",
                    )
                )
                continue
            self.out.keys[key_path] = _pos(key_node.start_mark)
            result[key] = self.build(value_node, key_path)
        self.out.values.pop((*path, "<key>"), None)
        for k, v in merged.items():
            result.setdefault(k, v)
        return result
