"""FastVConfig: where FastV prunes, how many image tokens it keeps, and which rule chooses them.

It is the FastV pruning method (`fastv_advanced.methods.fastv`); this module keeps the guide's import path.
"""

from .methods.fastv import FastVConfig

__all__ = ["FastVConfig"]
