"""Load a spec file: YAML with positions -> `Spec`, or one `SpecError` listing every problem.

Each problem reads `file:line:col field.path: message`. Syntax errors, duplicate keys,
schema errors (with a did-you-mean for unknown keys and values) and broken references are
all collected before anything is raised, and nothing else is touched (no state, no I/O
beyond reading the file).
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from reconciler.errors import SpecError, TerminalError
from reconciler.builtins import option_keys, option_names, options_model
from reconciler.references import RefProblem, check_references
from reconciler.spec import EvalStage, RLStage, SFTStage, Spec
from reconciler.suggest import suggest
from reconciler.yamlpos import ParsedYaml, Pos, parse_yaml

YamlPath = tuple[str | int | float, ...]


class LoadedSpec(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    path: str
    spec_dir: str
    spec: Spec
    text: str


def load_spec(path: str | Path) -> LoadedSpec:
    """Read, parse and validate a spec file; raise SpecError with every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise TerminalError(f"Spec {path} not found", str(err), "pass the path of a spec YAML file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(str(path), [f"{path}: cannot read spec: {err}"]) from err
    spec = parse_spec_text(text, str(path))
    return LoadedSpec(path=str(p), spec_dir=str(p.resolve().parent), spec=spec, text=text)


def parse_spec_text(text: str, filename: str = "<spec>") -> Spec:
    """Validate spec text; `filename` only labels the error lines."""
    problems: list[tuple[Pos, str, str]] = []  # (position, field path, message)
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise SpecError(filename, [f"{filename}:1:1 the spec is empty (expected a mapping with at least `name:`)"])
    parsed = parse_yaml(text)
    for yp in parsed.problems:
        problems.append((yp.pos, _dotted(yp.path), yp.message))
    if parsed.problems and parsed.data is None:
        raise SpecError(filename, _format(filename, problems))
    if not isinstance(parsed.data, dict):
        got = "nothing" if parsed.data is None else type(parsed.data).__name__
        problems.append((parsed.root_pos, "", f"the spec must be a mapping of keys (name, stages, ...), got {got}"))
        raise SpecError(filename, _format(filename, problems))

    spec: Spec | None = None
    try:
        spec = Spec.model_validate(parsed.data)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            problems.append(_schema_problem(parsed, e))
    for ref in check_references(parsed.data):
        problems.append(_ref_problem(parsed, ref))
    if problems or spec is None:
        raise SpecError(filename, _format(filename, problems))
    return spec


def _format(filename: str, problems: list[tuple[Pos, str, str]]) -> list[str]:
    seen: set[str] = set()
    lines: list[str] = []
    for pos, field, msg in sorted(problems, key=lambda p: (p[0].line, p[0].col)):
        line = f"{filename}:{pos.line}:{pos.col} {field + ': ' if field else ''}{msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def _dotted(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- locating errors


# The stage union's tags (pydantic puts them in error locations) and the model each names.
STAGE_KINDS: dict[str, type[SFTStage | RLStage | EvalStage]] = {"sft": SFTStage, "rl": RLStage, "eval": EvalStage}


def _data_path(data: Any, loc: tuple[Any, ...]) -> YamlPath:
    """Drop pydantic's union tags (`stages.sft.sft.optim` -> `stages.sft.optim`) by following
    the loc through the actual data; stops at the first element that is not there."""
    path: list[str | int] = []
    node = data
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in STAGE_KINDS and node.get("kind") == part:
            pass  # discriminated-union tag, not a key
        else:
            path.extend(loc[i:])  # a missing key: keep its name for the message
            break
        i += 1
    return tuple(path)


def _locate(parsed: ParsedYaml, path: YamlPath, *, key: bool) -> Pos:
    """Position of the nearest existing path: its key (or value), else its parent's.
    Mappings and lists are located by their key (a block value starts a line later)."""
    for n in range(len(path), 0, -1):
        prefix = path[:n]
        key = key or n < len(path) or isinstance(_get(parsed.data, prefix), (dict, list))
        pos = (parsed.keys.get(prefix) if key else None) or parsed.values.get(prefix) or parsed.keys.get(prefix)
        if pos is not None:
            return pos
    return parsed.root_pos


def _get(data: Any, path: YamlPath) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _ref_problem(parsed: ParsedYaml, ref: RefProblem) -> tuple[Pos, str, str]:
    return _locate(parsed, ref.path, key=False), _dotted(ref.path), ref.message


def _schema_problem(parsed: ParsedYaml, e: Any) -> tuple[Pos, str, str]:
    loc = tuple(e["loc"])
    path = _data_path(parsed.data, loc)
    etype = e["type"]
    msg = e["msg"].removeprefix("Value error, ")
    if etype == "missing":
        parent = path[:-1]
        return _locate(parsed, parent, key=True), _dotted(path), "required field is missing"
    if etype == "extra_forbidden":
        name = str(path[-1])
        builtin = _builtin_options_at(parsed.data, path[:-1])
        if builtin is not None:
            source, model = builtin
            keys = option_keys(model)
            msg = f"unknown option {name!r} of {source} (options: {', '.join(keys)}){suggest(name, option_names(model))}"
            return _locate(parsed, path, key=True), _dotted(path), msg
        fields = _model_fields_at(loc[:-1])
        hint = suggest(name, fields) if fields else ""
        return _locate(parsed, path, key=True), _dotted(path), f"unknown key {name!r}{hint}"
    if etype in ("literal_error", "enum") and isinstance(e.get("input"), str):
        expected = _literal_choices(e)
        msg = f"{msg} (got {e['input']!r}){suggest(e['input'], expected)}"
    elif "input" in e and etype not in ("value_error", "assertion_error", "stage_kind", "model_type", "dict_type"):
        msg = f"{msg} (got {_short(e['input'])})"
    if etype == "value_error":
        target = _get(parsed.data, path)
        named = [k for k in target if f"{k!r}" in msg] if isinstance(target, dict) else []
        if len(named) == 1:  # a validator over a whole mapping that names one key: point at it
            path = (*path, named[0])
    if etype == "stage_kind":
        kind = e["input"].get("kind") if isinstance(e["input"], dict) else None
        if isinstance(kind, str):
            msg = f"{msg} (got {kind!r}){suggest(kind, ['sft', 'rl', 'eval'])}"
            path = (*path, "kind")
        elif isinstance(e["input"], dict):
            msg = "missing `kind:` (`sft`, `rl` or `eval`)"
    return _locate(parsed, path, key=False), _dotted(path), msg


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _literal_choices(e: Any) -> list[str]:
    expected = (e.get("ctx") or {}).get("expected", "")
    return [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",") if c.strip()]


def _builtin_options_at(data: Any, path: YamlPath) -> tuple[str, type[BaseModel]] | None:
    """For `datasets.<name>.options` / `models.<name>.options` of a builtin source: the
    source and its options model (the schema types `options` as a plain dict)."""
    if len(path) != 3 or path[0] not in ("datasets", "models") or path[2] != "options":
        return None
    body = _get(data, path[:2])
    source = body.get("source") if isinstance(body, dict) else None
    model = options_model("datasets" if path[0] == "datasets" else "models", source)
    return (str(source), model) if model is not None else None


def _model_fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model a pydantic loc points into (for did-you-mean)."""
    tp: Any = Spec
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    models = [m for m in _unwrap(tp) if isinstance(m, type) and issubclass(m, BaseModel)]
    return sorted({f for m in models for f in m.model_fields})


def _unwrap(tp: Any) -> list[Any]:
    """Concrete alternatives of an annotation (Optional/Union/Annotated peeled)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a) if t is not type(None)]
    return [tp]


def _step(tp: Any, part: Any) -> Any:
    for alt in _unwrap(tp):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            if part in alt.model_fields:
                return alt.model_fields[part].annotation
            continue
        origin = typing.get_origin(alt)
        if origin is dict:
            return typing.get_args(alt)[1]
        if origin in (list, tuple):
            return typing.get_args(alt)[0]
    if part in STAGE_KINDS:
        return STAGE_KINDS[part]
    return None


# --------------------------------------------------------------------------- locations


def find_repo_root(spec_path: str | Path) -> Path:
    """The nearest directory at or above the spec holding `.git`; else the spec's directory."""
    start = Path(spec_path).resolve().parent
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return start


def default_state_dir(loaded: LoadedSpec) -> Path:
    """`state.path` (relative to the spec's directory) or `<repo root>/.retool`."""
    configured = loaded.spec.state.path
    if configured:
        p = Path(configured).expanduser()
        return p if p.is_absolute() else Path(loaded.spec_dir) / p
    return find_repo_root(loaded.path) / ".retool"


def schema_text() -> str:
    """The JSON Schema of the spec, as committed in `retool.schema.json`."""
    return json.dumps(Spec.model_json_schema(), indent=2, ensure_ascii=False) + "\n"

