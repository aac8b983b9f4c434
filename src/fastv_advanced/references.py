"""Finding a plugged-in object by `package.module:name`, for the registries (strategies, methods)."""

from __future__ import annotations

import importlib
from typing import Callable


def import_reference(reference: str, what: str, accept: Callable[[object], bool], kind: str):
    """The object `reference` (`package.module:name`) points to; ValueError naming `what` (e.g. "pruning method
    'x:Y'") when the module cannot be imported or holds no `kind` called `name` that `accept` takes."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({exc})") from exc
    found = getattr(module, attr, None)
    if not accept(found):
        raise ValueError(f"{what}: module {module_name!r} has no {kind} {attr!r}")
    return found
