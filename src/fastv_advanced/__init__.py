"""FastV Advanced: physically drop a VLM's image tokens inside its language model, by any pruning method."""

from .methods import (
    Choice, PruningMethod, Stage, StageInputs, available_methods, build_method, get_method_class, register_method,
)
from .methods.fastv import FastVConfig
from .pruning import FastVPruner, Pruner, Selection, apply_fastv, apply_pruning
from .strategies import available_strategies, get_strategy, register_strategy

__all__ = [
    "Choice",
    "FastVConfig",
    "FastVPruner",
    "Pruner",
    "PruningMethod",
    "Selection",
    "Stage",
    "StageInputs",
    "apply_fastv",
    "apply_pruning",
    "available_methods",
    "available_strategies",
    "build_method",
    "get_method_class",
    "get_strategy",
    "register_method",
    "register_strategy",
]
__version__ = "0.1.0"
