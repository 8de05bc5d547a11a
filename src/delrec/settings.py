"""Typed configuration from YAML, with errors that name the file, the line and the field.

Each component owns a small dataclass (``DataConfig``, ``TeacherConfig``, ``DistillConfig`` …). This module turns
nested dicts (a YAML file plus ``--set a.b=c`` overrides) into those dataclasses, checking every key and value type,
and maps a bad key back to the line of the YAML file it came from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from delrec.errors import ConfigError, clip

T = TypeVar("T")

# Bounds on a config file, checked before any Python object is built: a config is a few KB, and a YAML alias bomb
# (nine levels of nine aliases) is tiny on disk but expands to 9**9 values in every walk over it.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 100_000
# numpy's SeedSequence and torch.manual_seed take non-negative seeds; 32 bits keeps every consumer happy.
MAX_SEED = 2**32 - 1


class _YAMLTooBig(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases while composing, so a bomb is refused before it is expanded."""

    aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise _YAMLTooBig(f"more than {MAX_YAML_ALIASES} YAML aliases (*name)", line)
        return super().compose_node(parent, index)  # type: ignore[no-any-return]


# YAML 1.1 (PyYAML) also reads yes/no/on/off as booleans, so `--set finetune.distill_lift=off` (a value the option
# documents) arrived as False and was refused as "must be text". YAML 1.2 (core schema) keeps only true/false.
_BOOL = "tag:yaml.org,2002:bool"
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_BoundedLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1 (PyYAML) reads "1e-4" as a string, so `--set finetune.lr=1e-4` would be refused; YAML 1.2 reads it as
# the float everyone means. Added after the 1.1 float resolver, so ints and "1.0e-4" resolve as before.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded (a shared node counts each time)."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in memo:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            memo[id(node)] = 1 + sum(size(c) for c in children)
        return memo[id(node)]

    return size(root)


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree of ``text``, refusing alias bombs (raises yaml.YAMLError or _YAMLTooBig)."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None and _expanded_size(root) > MAX_YAML_VALUES:
        raise _YAMLTooBig(f"the YAML expands to more than {MAX_YAML_VALUES} values (aliases?)", None)
    return root


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` within the bounds above."""
    root = _compose(text)
    return None if root is None else _BoundedLoader("").construct_document(root)


def yaml_lines(text: str, file: str | Path | None = None) -> dict[str, int]:
    """Map dotted key paths (``finetune.lr``) to 1-based line numbers in a YAML document; a key given twice in one
    mapping is an error (PyYAML would silently keep the last one)."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                if path in out:
                    raise ConfigError(f"given twice (first on line {out[path]})", file=file,
                                      line=key.start_mark.line + 1, field=path)
                out[path] = key.start_mark.line + 1
                walk(value, path)

    try:
        root = _compose(text)
    except (yaml.YAMLError, _YAMLTooBig):  # load_yaml reports these
        return out
    if root is not None:
        walk(root, "")
    return out


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping; returns (data, line numbers by dotted key)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError("is a folder, not a YAML file", file=path)
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"larger than {MAX_YAML_BYTES >> 20} MB; a config is a few KB", file=path)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason})", file=path) from None
    except OSError as e:  # unreadable, a symlink loop, a name too long …
        raise ConfigError(f"cannot read the config file ({e.strerror or type(e).__name__})", file=path) from None
    try:
        data = _safe_load(text)
    except _YAMLTooBig as e:
        raise ConfigError(e.message, file=path, line=e.line) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", file=path,
                          line=None if mark is None else mark.line + 1) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections", file=path, line=1)
    return data, yaml_lines(text, path)


def parse_override(text: str) -> tuple[str, Any]:
    """``"finetune.lr=1e-4"`` → ``("finetune.lr", 1e-4)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value", field="--set")
    key, _, raw = text.partition("=")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except _YAMLTooBig as e:
        raise ConfigError(e.message, field=key.strip() or "--set") from None
    return key.strip(), value


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{p!r} is a value, not a section", field=key)
        d = nxt
    d[parts[-1]] = value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "", file: str | Path | None = None,
          lines: dict[str, int] | None = None, base: T | None = None) -> T:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and value types recursively.

    ``base``: an instance whose values are the defaults (e.g. a profile); ``data`` overrides them.
    """
    lines = lines or {}
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", file=file, line=lines.get(prefix),
                          field=prefix or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown setting; expected one of: {', '.join(fields)}", file=file,
                              line=lines.get(path), field=path)
        start = getattr(base, key) if base is not None else None
        kwargs[key] = _coerce(hints[key], value, path, file, lines, start)
        # One rule for every seed of every component (their validate() need not repeat it).
        v = kwargs[key]
        if (key == "seed" or key.endswith("_seed")) and isinstance(v, int) and not 0 <= v <= MAX_SEED:
            raise ConfigError(f"a seed must be an integer from 0 to {MAX_SEED}, got {v}", file=file,
                              line=lines.get(path), field=path)
    obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)  # type: ignore[type-var]
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            # Re-anchor the component's error on the YAML line of its field.
            field = e.field or prefix
            if prefix and e.field and not e.field.startswith(prefix + "."):
                field = f"{prefix}.{e.field.split('.')[-1]}"
            raise ConfigError(e.message, file=file, line=lines.get(field), field=field) from None
    return obj


def _coerce(tp: Any, value: Any, path: str, file: str | Path | None, lines: dict[str, int], start: Any) -> Any:
    def fail(why: str) -> ConfigError:  # the value's repr is clipped: it may be a huge list or text
        return ConfigError(f"{why}, got {clip(repr(value), 80)}", file=file, line=lines.get(path), field=path)

    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path, file, lines, start)
            except ConfigError as e:
                errors.append(e)
        raise fail("invalid value")
    if origin is Literal:
        if value not in get_args(tp):
            raise fail(f"must be one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=path, file=file, lines=lines, base=start)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise fail("must be a list")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"must be a list of {len(args)} values")
            return tuple(_coerce(a, v, path, file, lines, None) for a, v in zip(args, value, strict=True))
        item = args[0] if args else Any
        coerced = [_coerce(item, v, path, file, lines, None) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise fail("must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("must be text")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict (tuples as lists) for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
