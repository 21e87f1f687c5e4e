"""Typed configs: dataclasses filled from YAML and `key=value` overrides; unknown keys are errors.

Each stage declares its own dataclass next to its code (e.g. `puzzle.stages.library.LibraryConfig`); this module
turns nested dicts into those dataclasses, strictly:

    cfg = load_config(LibraryConfig, "run.yaml", ["steps=200", "search_space.ffn_fractions=[1.0,0.5]"], section="library")

Single-stage commands (`puzzle search RUN ...`) start from the config the run was created with:

    cfg = load_stage_config(SearchConfig, run_dir, "search", yaml_path, overrides)

Every value is checked when its dataclass is built (each config's `__post_init__`), so a bad value fails
before any stage runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields; unknown keys raise."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PuzzleError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        check_moved_keys(data, f"{where}.{key}")
    if unknown:
        raise PuzzleError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PuzzleError(f"{where}: {e}") from None


# Keys a config may still carry from an older layout -> where they went (a one-line error says so).
MOVED_KEYS = {"costs.workloads": "moved to the top-level `workloads:` list (costs, search, eval and report name "
                                 "its workloads)"}


def check_moved_keys(data: dict[str, Any], where: str | None = None) -> None:
    """Raise for a key that moved: `where` is one dotted key of a section (e.g. "costs.workloads"), else every
    moved key is looked up in the whole run config `data`."""
    if where is not None:
        key = where.removeprefix("config.")
        if key in MOVED_KEYS:
            raise PuzzleError(f"{key} {MOVED_KEYS[key]}")
        return
    for key, moved in MOVED_KEYS.items():
        node: Any = data
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) and part in node else _ABSENT
        if node is not _ABSENT:
            raise PuzzleError(f"{key} {moved}")


_ABSENT = object()


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON/YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML: numbers, lists, booleans) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise PuzzleError(f"override {item!r} is not key=value (e.g. library.steps=200)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def _yaml_where(path: Path, e: yaml.YAMLError) -> str:
    """`path:line:column` (1-based) of a YAML error, where PyYAML knows it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem:
        return f"{problem} ({context})" if context else str(problem)
    return (str(e).splitlines() or ["unknown error"])[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"config file {path} does not exist; pass the path of a YAML config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PuzzleError(f"{_yaml_where(path, e)}: not valid YAML: {_yaml_problem(e)}; fix that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PuzzleError(f"{path}: the top level of a config must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None) -> T:
    """YAML file (optionally one top-level `section` of it) + overrides -> dataclass `cls`."""
    data = read_yaml(path) if path is not None else {}
    if section is not None:
        data = data.get(section) or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, where=section or cls.__name__)


def saved_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config `puzzle run` saved in `run_dir` (RunDir.config; {} when the run was built stage by stage)."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return {}
    from puzzle.core.artifacts import read_json  # local: artifacts imports torch

    data = read_json(path)
    if not isinstance(data, dict):
        raise PuzzleError(f"{path} is not a run config (not a mapping); delete it or rerun `puzzle run`")
    return data


def load_stage_config(cls: type[T], run_dir: str | Path, section: str, path: str | Path | None = None,
                      overrides: list[str] | None = None) -> T:
    """One stage's config for a single-stage command: the run's saved config (RUN/config.json) as the base, the
    YAML file's `section` on top (mappings merge, other values replace), then key=value overrides."""
    if section != "data" and not Path(run_dir).is_dir():  # only `puzzle data` may start a run directory
        raise PuzzleError(f"run directory {run_dir} does not exist; pass the directory `puzzle run` (or `puzzle "
                          "import` and `puzzle data`) wrote")
    data = saved_run_config(run_dir).get(section) or {}
    if path is not None:
        data = merge(data, read_yaml(path).get(section) or {})
    return from_dict(cls, apply_overrides(data, overrides or []), where=section)


def merge(base: Any, top: Any) -> Any:
    """`top` over `base`: nested mappings merge key by key; anything else (lists included) replaces."""
    if not isinstance(base, dict) or not isinstance(top, dict):
        return top
    return {**base, **{k: merge(base.get(k), v) for k, v in top.items()}}


def check_device(where: str, value: str | None) -> None:
    """A device torch can parse ("cpu", "cuda", "cuda:1"), "auto", or unset."""
    if value is None or value == "auto":
        return
    import torch  # local: configs are read before anything heavy is needed

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise PuzzleError(f"{where}={value!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check/convert one value against its annotation (dataclasses, Optional, list/tuple, scalars)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except PuzzleError as e:
                errors.append(str(e))
        raise PuzzleError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise PuzzleError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise PuzzleError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise PuzzleError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PuzzleError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PuzzleError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise PuzzleError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
