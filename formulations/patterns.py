"""N:M sparsity patterns: in every group of M consecutive weights keep exactly N (2:4 is what sparse tensor
cores run).

A block of n weights with pattern (N, M) has n/M groups, g = 0 … n/M − 1 holding the weights gM … gM + M − 1,
and the budget is fixed: k = n/M · N. A block made of several rows of one layer (d_in divisible by M) keeps
the groups inside rows, since rows are consecutive runs of d_in weights.

Everything here is a pure function of numbers: the engine and every solver use it to build, check and
bound supports, so the rule is defined once.

* :func:`parse_pattern` reads ``"unstructured"`` or ``"N:M"``.
* :func:`check_pattern` validates (N, M) against a block (n, k).
* :func:`pattern_violation` says why a support breaks the pattern (or None).
* :func:`top_per_group` keeps the N largest scores of each group (magnitude, Wanda, WoodFisher, the
  projection step of IHT, and the dual bound all use it).
* :func:`group_top_sum` is the largest sum of kept scores under the pattern: the dual bound
  D(α) − max_{S in pattern} Σ_{i∈S} c_i(α) is then a valid lower bound on the N:M optimum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidProblemError

__all__ = ["parse_pattern", "check_pattern", "pattern_violation", "top_per_group", "group_top_sum", "pattern_keep",
           "node_groups", "propagate", "top_within", "within_thresholds",
           "pattern_sparsity"]


def parse_pattern(text: Any) -> tuple[int, int] | None:
    """``"unstructured"`` (or None) → None; ``"N:M"`` → (N, M) with 1 <= N < M; else ValueError saying the
    allowed forms."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "unstructured"):
        return None
    if isinstance(text, (tuple, list)) and len(text) == 2:
        n, m = text
    elif isinstance(text, str) and text.count(":") == 1:
        a, b = text.split(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise ValueError(f"must be 'unstructured' or N:M with integers 1 <= N < M (e.g. 2:4). Got {text!r}.") \
                from None
    else:
        raise ValueError(f"must be 'unstructured' or N:M with integers 1 <= N < M (e.g. 2:4). Got {text!r}.")
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, (int, np.integer)) \
            or not isinstance(m, (int, np.integer)) or not 1 <= n < m:
        raise ValueError(f"must be 'unstructured' or N:M with integers 1 <= N < M (e.g. 2:4). Got {text!r}.")
    return int(n), int(m)


def pattern_sparsity(pattern: tuple[int, int] | None) -> float | None:
    """The sparsity an N:M pattern implies, 1 − N/M (None when unstructured)."""
    return None if pattern is None else 1.0 - pattern[0] / pattern[1]


def pattern_keep(n: int, pattern: tuple[int, int]) -> int:
    """Weights an N:M pattern keeps in a block of n (M dividing n): n/M · N."""
    return n // pattern[1] * pattern[0]


def check_pattern(pattern: Any, n: int, k: int) -> tuple[int, int]:
    """(N, M) if it is a valid pattern for a block of n weights keeping k, else InvalidProblemError."""
    try:
        parsed = parse_pattern(pattern)
    except ValueError as exc:
        raise InvalidProblemError(f"The 'pattern' argument of BlockProblem {exc}") from None
    if parsed is None:
        raise InvalidProblemError("The 'pattern' argument of BlockProblem must be None for an unstructured block, "
                                  "or (N, M). Got 'unstructured'.")
    N, M = parsed
    if n % M:
        raise InvalidProblemError(f"The 'pattern' argument of BlockProblem must have M dividing the block's {n} "
                                  f"weights. Got {N}:{M}.")
    keep = pattern_keep(n, parsed)
    if k != keep:
        raise InvalidProblemError(f"The 'n_keep' argument of BlockProblem must be n/M·N = {keep} with "
                                  f"pattern {N}:{M} and n = {n}. Got {k}.")
    return parsed


def pattern_violation(support: np.ndarray, pattern: tuple[int, int]) -> str | None:
    """None if the boolean ``support`` keeps exactly N in every group of M, else a sentence naming the first
    group that does not."""
    N, M = pattern
    s = np.asarray(support, dtype=bool)
    if s.size % M:
        return f"the support has {s.size} entries, not a multiple of M = {M}"
    counts = s.reshape(-1, M).sum(axis=1)
    bad = np.flatnonzero(counts != N)
    if bad.size:
        g = int(bad[0])
        return (f"group {g} (weights {g * M}..{g * M + M - 1}) keeps {int(counts[g])}, not {N} "
                f"({bad.size} of {counts.size} groups break {N}:{M})")
    return None


def top_per_group(scores: np.ndarray, pattern: tuple[int, int]) -> np.ndarray:
    """Boolean support (n,) keeping the N largest ``scores`` of every group of M (ties: lower index)."""
    N, M = pattern
    c = np.asarray(scores, dtype=np.float64).reshape(-1, M)
    order = np.argsort(-c, axis=1, kind="stable")[:, :N]
    keep = np.zeros_like(c, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(-1)


def group_top_sum(scores: np.ndarray, pattern: tuple[int, int]) -> float:
    """max over N:M supports S of Σ_{i∈S} scores_i: the sum of each group's N largest."""
    N, M = pattern
    c = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1, M), axis=1)
    return float(c[:, M - N:].sum())


# ---------------------------------------------------------------- a search over N:M supports (branch-and-bound)
# A node fixes some weights in (``keep``, global (n,) bool) and leaves ``free`` (global indices, ascending)
# undecided; the rest are out. Group g still needs need_g = N − (kept in g) of its free weights.
def node_groups(keep: np.ndarray, free: np.ndarray, pattern: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(group of every free weight (m,), need_g for every group (n/M,)) at a node."""
    N, M = pattern
    kept = np.bincount(np.flatnonzero(keep) // M, minlength=keep.size // M)
    return np.asarray(free) // M, N - kept


def propagate(keep: np.ndarray, free: np.ndarray, pattern: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The free weights the pattern decides at a node: (in, out) local masks (m,), or None when no N:M
    completion exists (a group with more than N kept, or fewer free weights than it still needs). A group
    that has its N is closed (its free weights out); one whose free weights are exactly what it needs
    takes them all."""
    groups, need = node_groups(keep, free, pattern)
    avail = np.bincount(groups, minlength=need.size)
    if (need < 0).any() or (avail < need).any():
        return None
    return (avail[groups] == need[groups]) & (need[groups] > 0), need[groups] == 0


def top_within(scores: np.ndarray, groups: np.ndarray, need: np.ndarray) -> np.ndarray:
    """Mask (m,) of the need_g largest ``scores`` within each group (ties: lower position)."""
    m = scores.size
    order = np.lexsort((np.arange(m), -scores, groups))  # by group, then score descending
    g = groups[order]
    first = np.searchsorted(g, g, side="left")  # position of each group's first entry in ``order``
    chosen = np.zeros(m, dtype=bool)
    chosen[order] = (np.arange(m) - first) < need[g]
    return chosen


def within_thresholds(scores: np.ndarray, groups: np.ndarray, need: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray]:
    """(chosen mask, the smallest chosen score of each weight's group, the largest unchosen one) (m,) each,
    for groups with 0 < need_g < free_g; reduced-cost fixing per group uses them as the unstructured search
    uses the k-th and (k+1)-th scores (−inf / +inf where a group has none)."""
    chosen = top_within(scores, groups, need)
    G = need.size
    low = np.full(G, np.inf)
    np.minimum.at(low, groups[chosen], scores[chosen])
    high = np.full(G, -np.inf)
    np.maximum.at(high, groups[~chosen], scores[~chosen])
    return chosen, low[groups], high[groups]
