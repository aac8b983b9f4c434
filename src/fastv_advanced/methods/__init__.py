"""Pruning methods by name: the registry, building a method from command-line strings, describing them.

`register_method` adds a class; `get_method_class("name")` or `get_method_class("package.module:Class")` finds
one; `build_method(name, {"param": "value"})` builds it, converting strings to each field's type.
"""

from __future__ import annotations

import dataclasses
import typing

from ..references import import_reference
from .base import Choice, PruningMethod, Stage, StageInputs, jsonable

_REGISTRY: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register `cls` under `cls.name` (overwriting an earlier one of that name)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[PruningMethod]:
    """The class registered as `name`, or the class `name` points to as `package.module:Class`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return import_reference(name, f"pruning method {name!r}",
                                lambda found: isinstance(found, type) and issubclass(found, PruningMethod),
                                "PruningMethod class")
    raise ValueError(
        f"pruning method {name!r} is not registered; registered: {', '.join(available_methods())} "
        "(or give 'package.module:Class')"
    )


def method_reference(method: PruningMethod) -> str:
    """The name that finds `method`'s class again: its registry name, else `module:Class`."""
    cls = type(method)
    if _REGISTRY.get(cls.name) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def method_record(method: PruningMethod) -> dict:
    """What result files record of a method: the name that finds it again and its parameters."""
    return {"name": method_reference(method), "parameters": jsonable(method.parameters())}


def _field_kind(cls: type, field: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(field.name, type(field.default))


def parse_value(text: str, kind, what: str):
    """Convert command-line text to a field's type (`int`, `float`, `bool`, `str`, tuples, `X | None`)."""
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return parse_value(text, args[0] if len(args) == 1 else str, what)
    if origin in (tuple, list):
        items = [t for t in text.strip().strip("[]()").split(",") if t.strip()]
        element = args[0] if args else str
        return tuple(parse_value(t.strip(), element, what) for t in items)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a valid {kind.__name__}") from None
    return text


def build_method(name: str, params: dict | None = None) -> PruningMethod:
    """Build method `name` from `params` (values, or strings to convert); ValueError names an unknown parameter."""
    cls = get_method_class(name)
    fields = {f.name: f for f in cls.parameter_fields()}
    values = {}
    for key, value in (params or {}).items():
        if key not in fields:
            raise ValueError(
                f"pruning method {cls.name or name!r} has no parameter {key!r}; its parameters: {', '.join(fields)}"
            )
        values[key] = parse_value(value, _field_kind(cls, fields[key]), f"{key}") if isinstance(value, str) else value
    return cls(**values)


def describe_method(cls: type[PruningMethod]) -> str:
    """One line per method for `--help`: name, then each parameter with its default."""
    params = ", ".join(f"{f.name}={_default_text(f)}" for f in cls.parameter_fields() if f.name not in cls.not_in_results)
    presets = f"; presets {', '.join(cls.presets)}" if cls.presets else ""
    return f"{cls.name}: {params}{presets}"


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    return "required"


def describe_methods() -> str:
    """Every registered method with its parameters and defaults."""
    return "\n".join(describe_method(_REGISTRY[n]) for n in available_methods())


def method_from_run(run: dict) -> PruningMethod | None:
    """The method a JSONL header's `run` records (None for the unpruned baseline)."""
    recorded = run.get("pruning_method")
    if recorded:
        return build_method(recorded["name"], recorded.get("parameters") or {})
    for cls in _REGISTRY.values():
        method = cls.from_run_section(run)
        if method is not None:
            return method
    return None


def method_from_result(section: dict) -> PruningMethod | None:
    """The method a result file's model-config section records (None for the unpruned baseline)."""
    recorded = section.get("pruning_method")
    if recorded is not None:
        return build_method(recorded["name"], recorded.get("parameters") or {})
    for cls in _REGISTRY.values():
        method = cls.from_legacy_result(section)
        if method is not None:
            return method
    return None


from . import dart, divprune, fastv, grid, pdrop, sparsevlm, visionzip  # noqa: E402,F401  (built-in methods register themselves)

__all__ = [
    "Choice", "PruningMethod", "Stage", "StageInputs", "available_methods", "build_method", "describe_methods",
    "get_method_class", "method_from_result", "method_from_run", "method_record", "method_reference", "register_method",
]
