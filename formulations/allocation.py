"""Budget across blocks: how many weights each block keeps, given a global budget K (DESIGN.md §1).

Blocks are independent given a budget k_b each (block-diagonal Fisher). Rules:

- *global threshold*: keep the K largest scores over all blocks (magnitude |w|, or OBS scores
  w_i²/[H⁻¹]_ii); k_b = how many of block b's weights are among them;
- *uniform*: k_b ≈ (K/n) n_b for every block, rounded so that Σ k_b = K (largest remainders).
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidProblemError

__all__ = ["allocate_global", "allocate_uniform", "n_keep_for", "sparsity_schedule", "SCHEDULES"]

#: sparsity schedules of multi-stage pruning
SCHEDULES = ("linear", "exp", "poly")


def n_keep_for(n_total: int, sparsity: float) -> int:
    """K = round((1 − sparsity) · n_total), the number of weights kept overall."""
    return int(round((1.0 - sparsity) * n_total))


def allocate_global(scores: list[np.ndarray], n_keep: int) -> list[int]:
    """k_b from a global threshold on ``scores`` (one float array per block, higher = keep).

    Ties at the threshold are broken by block order then index (deterministic), so Σ k_b = K exactly.
    """
    sizes = [s.size for s in scores]
    total = sum(sizes)
    if not 0 <= n_keep <= total:
        raise InvalidProblemError(f"The 'n_keep' argument of allocate_global() must be in [0, {total}]. Got {n_keep}.")
    flat = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores]) if scores else np.zeros(0)
    if not np.all(np.isfinite(flat)):
        raise InvalidProblemError("The 'scores' argument of allocate_global() must be finite. Got NaN or inf.")
    keep = np.zeros(total, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:n_keep]] = True
    bounds = np.cumsum([0] + sizes)
    return [int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]


def allocate_uniform(sizes: list[int], n_keep: int) -> list[int]:
    """k_b proportional to n_b with Σ k_b = K (largest-remainder rounding)."""
    total = sum(sizes)
    if not 0 <= n_keep <= total:
        raise InvalidProblemError(f"The 'n_keep' argument of allocate_uniform() must be in [0, {total}]. Got {n_keep}.")
    if total == 0:
        return [0] * len(sizes)
    exact = np.array(sizes, dtype=np.float64) * n_keep / total
    base = np.floor(exact).astype(int)
    rest = n_keep - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rest]] += 1
    return [int(min(b, s)) for b, s in zip(base, sizes)]


def sparsity_schedule(target: float, stages: int, kind: str = "exp", start: float = 0.0) -> list[float]:
    """Sparsity after each of ``stages`` stages, ending exactly at ``target`` (s_0 = ``start``, t = 1..K).

    - ``linear``: s_t = s_0 + (s − s_0) t/K;
    - ``exp``:    1 − s_t = (1 − s_0)^{1 − t/K} (1 − s)^{t/K}: the kept fraction shrinks by the same factor
      every stage;
    - ``poly``:   s_t = s − (s − s_0)(1 − t/K)³ (Zhu & Gupta's cubic schedule: large steps first, small
      steps near the target, where each removal costs most).
    """
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise InvalidProblemError(f"The 'stages' argument of sparsity_schedule() must be an integer >= 1. Got {stages!r}.")
    if kind not in SCHEDULES:
        raise InvalidProblemError(
            f"The 'kind' argument of sparsity_schedule() must be one of {', '.join(SCHEDULES)}. Got {kind!r}."
        )
    for name, value in (("target", target), ("start", start)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise InvalidProblemError(f"The '{name}' argument of sparsity_schedule() must be in [0, 1). Got {value!r}.")
    if start > target:
        raise InvalidProblemError(
            f"The 'start' argument of sparsity_schedule() must be at most target = {target}. Got {start}."
        )
    out = []
    for t in range(1, int(stages) + 1):
        f = t / stages
        if kind == "linear":
            s = start + (target - start) * f
        elif kind == "exp":
            s = 1.0 - (1.0 - start) ** (1.0 - f) * (1.0 - target) ** f
        else:
            s = target - (target - start) * (1.0 - f) ** 3
        out.append(float(s))
    out[-1] = float(target)
    return out
