"""Typed, read-only run configuration: YAML files loaded into frozen dataclasses, `section.key=value` overrides.

Every stage declares its configuration as a frozen dataclass whose fields are either plain values or nested
section dataclasses. `load_config` reads a YAML file, applies command-line overrides and checks every key and
every type, so a typo is caught before any work starts, with the valid keys listed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin

import yaml

from berth.core.errors import BerthError
from berth.core.layout import CONFIG_FILENAME

T = TypeVar("T")


class ConfigError(BerthError):
    pass


class _Override(str):
    """A value typed on the command line: parsed by the type of the field it lands in, not up front."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML) into `cls`, then apply `section.key=value` overrides in order."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(config_file(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected section.key=value")
        _set_dotted(raw, key.strip().split("."), _Override(value), item)
    return from_dict(cls, raw, source=source)


def config_file(path: str | Path) -> Path:
    """`path` itself when it is a file; else the config shipped with berth under that name
    (`configs/pretrain/mini_zh.yaml` or `pretrain/mini_zh.yaml`), so the documented commands work from any
    directory once berth is installed. A name that is neither comes back unchanged, for the caller's error."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    shipped = importlib.resources.files("berth.configs").joinpath(given.as_posix().removeprefix("configs/"))
    return Path(str(shipped)) if shipped.is_file() else given


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build the dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a section (a mapping), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, prefix, str(key), list(fields)))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from None


def _unknown_key_message(source: str, prefix: str, key: str, valid: list[str]) -> str:
    section = prefix.rstrip(".")
    where = f"in section '{section}'" if section else "at the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{prefix}{key}'{hint}; valid keys {where}: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, _Override):
            raise ConfigError(f"{source}: '{key}' is a section; set one of its keys, e.g. {key}.KEY=VALUE")
        return from_dict(cast(type, tp), value or {}, source, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if type(None) in options and (value is None or (isinstance(value, _Override) and value in ("", "null"))):
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if isinstance(value, _Override) and tp is not str:
        value = _parse_override(value, source, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value] if value else []  # a single item needs no YAML list syntax on the command line
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list; got {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        return tuple(_convert(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _float_or_same(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: '{key}' has unsupported type {_type_name(tp)}")


def _float_or_same(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _parse_override(value: str, source: str, key: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{source}: override for '{key}': cannot parse {value!r}") from None


def check_rates(**rates: float | None) -> None:
    """Dropout rates and other shares of a whole that must lie in [0, 1) (None: not set)."""
    for name, rate in rates.items():
        if rate is not None and not (math.isfinite(rate) and 0.0 <= rate < 1.0):
            raise ValueError(f"{name} must be in [0, 1); got {rate}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-friendly data (tuples become lists)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return plain(cfg)


def portable_path(value: str, run_dir: Path) -> str:
    """An absolute local path as a published card may show it: relative to the run directory or to the directory
    the command ran in when it lies inside one of them, else its last part only. Other values stay as they are."""
    path = Path(value)
    if not path.is_absolute():
        return value
    for base in (run_dir.resolve(), Path.cwd().resolve()):
        if path.resolve().is_relative_to(base):
            return str(path.resolve().relative_to(base)) or "."
    return path.name


def portable_config(cfg: T, run_dir: Path) -> T:
    """`cfg` with every absolute local path made portable (`portable_path`), for model cards that get published."""

    def walk(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {f.name: walk(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return dataclasses.replace(value, **changes)
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        return portable_path(value, run_dir) if isinstance(value, str) else value

    return cast(T, walk(cfg))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, output_dir: str | Path) -> Path:
    """Write the resolved config into the run directory, so every output says how it was made."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILENAME
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)
    return path
