"""Pick a solver for one block when the user names none (``cbs solve`` without ``--solver``).

The rule is "exact and fast where possible":

1. ``brute_force`` when C(n, k) <= 200,000 supports and n is within its size limit (24 by default;
   the constructor accepts up to 40, so blocks of 25..40 weights with few supports get ``max_size = n``):
   a proven optimum in well under a second.
2. ``bnb`` (branch and bound, exact, certified bound) when n <= 64 (its own limit is 512).
3. ``swap`` otherwise: swap local search on the true E(S), no size limit; the engine certifies its answer
   with the dual bound, so the gap is still reported. (For blocks keeping more than its ``max_keep``
   weights swap returns its magnitude start with a warning, never an error.)

An N:M block (``problem.pattern``) gets brute force over its C(M, N)^(n/M) pattern supports when they are
at most 200,000, else ``bnb`` (which searches N:M supports only) when n <= 48, else ``swap`` within groups.

Every candidate is instantiated and checked (available, block within ``capabilities.max_size``) before it
is chosen; one that fails falls through to the next, and ``magnitude`` is the last resort.
"""

from __future__ import annotations

import math
from typing import Any

from formulations.problem import BlockProblem

from .errors import InvalidOptionError
from .solvers.registry import get_solver

__all__ = ["choose_solver", "BRUTE_FORCE_MAX_SUPPORTS", "BNB_MAX_SIZE"]

#: the most supports C(n, k) brute force is chosen for
BRUTE_FORCE_MAX_SUPPORTS = 200_000
#: the largest block branch and bound is chosen for
BNB_MAX_SIZE = 64
#: largest N:M block given to bnb (2:4 Gaussian blocks, N = 2n: n = 40 proved in 0.6 s, n = 64 in 288 s)
BNB_PATTERN_MAX_SIZE = 48
#: the hard upper limit of BruteForceSolver(max_size=...)
_BRUTE_FORCE_HARD_MAX = 40


def _fits(name: str, params: dict[str, Any], n: int) -> bool:
    """True when solver ``name`` with ``params`` exists, is installed and accepts a block of n weights."""
    try:
        inst = get_solver(name, **params)
    except Exception:  # noqa: BLE001 - a missing or broken solver just falls through
        return False
    available = inst.available() if hasattr(inst, "available") else True
    cap = getattr(inst, "capabilities", None)
    max_size = getattr(cap, "max_size", None)
    return available and (max_size is None or n <= max_size)


def choose_solver(problem: BlockProblem) -> tuple[str, dict[str, Any], str]:
    """(solver name, constructor params, one-line reason) for ``problem``; see the module docstring.

    ``get_solver(name, **params)`` builds the solver; it accepts the block (n within its size limit).
    """
    if not isinstance(problem, BlockProblem):
        raise InvalidOptionError(
            f"The 'problem' argument of choose_solver() must be a BlockProblem. Got {type(problem).__name__}."
        )
    n, k = problem.n, problem.n_keep
    if problem.pattern is not None:  # only the solvers that honour N:M patterns
        N, M = problem.pattern
        supports = math.comb(M, N) ** (n // M)
        if supports <= BRUTE_FORCE_MAX_SUPPORTS and n <= _BRUTE_FORCE_HARD_MAX:
            params = {} if n <= (get_solver("brute_force").capabilities.max_size or 0) else {"max_size": n}
            return ("brute_force", params, f"{N}:{M} pattern, C({M}, {N})^{n // M} = {supports:,} supports: exact "
                    "by enumeration")
        if n <= BNB_PATTERN_MAX_SIZE and _fits("bnb", {}, n):
            return ("bnb", {}, f"{N}:{M} pattern, n = {n} <= {BNB_PATTERN_MAX_SIZE} ({supports:.3g} supports): exact "
                    "by branch and bound over N:M supports")
        return ("swap", {}, f"{N}:{M} pattern, n = {n} > {BNB_PATTERN_MAX_SIZE}: swap local search within groups, "
                "certified by the group dual bound")
    # C(n, k) only matters for n <= 64; for a layer of 10⁵ weights it would be a huge integer
    supports = math.comb(n, k) if n <= BNB_MAX_SIZE else None

    if supports is not None and supports <= BRUTE_FORCE_MAX_SUPPORTS and n <= _BRUTE_FORCE_HARD_MAX:
        default_max = get_solver("brute_force").capabilities.max_size or _BRUTE_FORCE_HARD_MAX
        params: dict[str, Any] = {} if n <= default_max else {"max_size": n}
        if _fits("brute_force", params, n):
            return ("brute_force", params,
                    f"C({n}, {k}) = {supports:,} <= {BRUTE_FORCE_MAX_SUPPORTS:,} supports: exact by enumeration")

    if n <= BNB_MAX_SIZE and _fits("bnb", {}, n):
        return ("bnb", {},
                f"n = {n} <= {BNB_MAX_SIZE} (C({n}, {k}) = {_short(supports)} supports): exact by branch and bound")

    if _fits("swap", {}, n):
        why = f"n = {n} > {BNB_MAX_SIZE}" if n > BNB_MAX_SIZE else f"n = {n}, no exact solver accepts the block"
        return ("swap", {}, f"{why}: swap local search on E(S), certified by the dual bound")

    return ("magnitude", {}, f"n = {n}: no other solver is available; magnitude, certified by the dual bound")


def _short(count: int | None) -> str:
    """A support count, in full when short, else as a power of ten."""
    if count is None:
        return "?"
    return f"{count:,}" if count < 10**12 else f"~1e{int(math.log10(count))}"
