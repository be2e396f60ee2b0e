"""Typed configs: YAML files and dotted CLI overrides parsed into frozen dataclasses.

Every command owns one frozen dataclass built of small parts. YAML may only set fields that exist;
an unknown key is an error that names the full dotted key and the allowed ones.

    cfg = load_config(CorpusConfig, "configs/corpus/tiny.yaml", ["render.png_compression=1"])
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} must be one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}: {value!r}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if value is None:  # `key:` in YAML, `key=` on the command line: the empty string
            return ""
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (allowed under {prefix or 'top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field was not given
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=1e-4", "--data.size", "64"]` -> [("optim.lr", 1e-4), ("data.size", 64)] (YAML-typed)."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(overrides):
        item = overrides[i].removeprefix("--")
        if "=" in item:
            key, raw = item.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override --{item} has no value (use --{item} VALUE or {item}=VALUE)")
            key, raw = item, overrides[i + 1]
            i += 2
        pairs.append((key, yaml.safe_load(raw)))
    return pairs


def config_from_dict(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None) -> T:
    """Build `cls` from a plain dict plus dotted overrides."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return _build(cls, data)


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load a YAML file into the frozen dataclass `cls`; overrides are dotted `key=value` strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    try:
        return config_from_dict(cls, data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config: equal configs give equal hashes."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_OVERRIDE_DEST = "override:"


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One hidden `--dotted.key VALUE` option per field of `cls` (and per default key of dict fields),
    so a mistyped setting is an argparse error naming the option. Collect them with `cli_overrides`."""

    def add(node: type, prefix: str) -> None:
        hints = typing.get_type_hints(node)
        for f in dataclasses.fields(node):
            dotted, tp = prefix + f.name, hints[f.name]
            if dotted in skip:
                continue
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                add(tp, dotted + ".")
                continue
            names = [dotted]
            if get_origin(tp) is dict and f.default_factory is not dataclasses.MISSING:
                names += [f"{dotted}.{key}" for key in f.default_factory()]
            for name in names:
                parser.add_argument(
                    f"--{name}", dest=_OVERRIDE_DEST + name, metavar="VALUE", help=argparse.SUPPRESS
                )

    add(cls, "")


def cli_overrides(args: argparse.Namespace, positional: list[str] | None = None) -> list[str]:
    """`key=value` overrides from the positional list plus every `--dotted.key VALUE` that was given."""
    given = [
        f"{k[len(_OVERRIDE_DEST) :]}={v}"
        for k, v in vars(args).items()
        if k.startswith(_OVERRIDE_DEST) and v is not None
    ]
    return list(positional or []) + given
