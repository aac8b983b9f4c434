"""FastV Advanced: drop LLaVA's image tokens after decoder layer K, chosen by a pluggable strategy."""

from .config import FastVConfig
from .pruning import FastVPruner, Selection, apply_fastv
from .strategies import available_strategies, get_strategy, register_strategy

__all__ = [
    "FastVConfig",
    "FastVPruner",
    "Selection",
    "apply_fastv",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
__version__ = "0.1.0"
