"""Selection methods under one contract (DESIGN.md §3)."""

from .base import Capabilities, SubsetSolver, top_k_support
from .registry import get_solver, refresh, register_solver, solver_info, solver_names

__all__ = [
    "Capabilities",
    "SubsetSolver",
    "top_k_support",
    "get_solver",
    "refresh",
    "register_solver",
    "solver_info",
    "solver_names",
]
