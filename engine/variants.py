"""Research variants of the update that measured as losses or are off in every recommendation (figures in
docs/results.md, "What did not help"). They stay reachable through ``--param NAME=VALUE`` and the Python API
so that the experiments can be repeated; no recommendation turns them on.

* ``compensate``: parameters that are never pruned but move with the kept weights (their own blocks, all
  weights kept, so their update is the damped Newton step −(F_b + λI)⁻¹ g_b).
* ``couple_mean``: the blocks' Newton steps coupled through the mean gradient row (:func:`couple_mean`).
* ``block_steps``: each block's update scaled by its own step from the blocks' joint quadratic model
  (:func:`formulations.objective.block_step_sizes`).
* ``newton_step_only``: the step search's segment starts at the CBS-U update without the gradient term.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from formulations.objective import block_step_sizes
from formulations.problem import BlockProblem

from .config import COMPENSATE
from .errors import invalid_option
from .progress import get_logger
from .update import batched_update

__all__ = ["compensating_parameters", "couple_mean", "scale_block_steps", "plain_updates"]

log = get_logger(__name__)


def compensating_parameters(model: nn.Module, parameter_names: list[str], spec: tuple[str, ...] | str) -> tuple[str, ...]:
    """The parameter names a ``PruneConfig.compensate`` value stands for: the tuple itself, or for "rest"
    every trainable parameter of ``model`` outside ``parameter_names``, for "norm" those of its normalisation
    layers (BatchNorm, LayerNorm, GroupNorm, ...), in the model's order."""
    if not isinstance(spec, str):
        return tuple(spec)
    if spec not in COMPENSATE:
        raise invalid_option("spec", "compensating_parameters()", f"one of {', '.join(COMPENSATE)} or a tuple of "
                             "parameter names", repr(spec))
    pruned = set(parameter_names)
    if spec == "rest":
        return tuple(n for n, p in model.named_parameters() if p.requires_grad and n not in pruned)
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, norm_types):
            out += [f"{mod_name}.{n}" if mod_name else n for n, p in mod.named_parameters(recurse=False)
                    if p.requires_grad]
    return tuple(n for n in out if n not in pruned)


def couple_mean(problems: list[BlockProblem], supports: list[np.ndarray], updates: list, batch: int) -> None:
    """The joint Newton step of the blocks under H = blockdiag(Cov_b + λI) + m mᵀ (m: the mean gradient row
    over all blocks; the blocks' factors are centred, so Cov_b = X_bᵀX_b): with d_b⁰ each block's own update
    and a_b = −(H_b)_SS⁻¹ m_S (zero off S), d_b = d_b⁰ + s a_b with s = Σ m_bᵀd_b⁰ / (1 + Σ m_bᵀ H_b⁻¹ m_b).
    Edits ``updates[i].weights`` in place."""
    means = [p.gradient * batch for p in problems]  # m_b: the gradient term is m_b / B
    aux = [BlockProblem(np.zeros(p.n), p.n_keep, p.damping, factor=p.factor, gradient=m_b)
           for p, m_b in zip(problems, means)]
    a = [u.weights for u in batched_update(aux, supports)]
    s0 = sum(float(m_b @ (u.weights - p.weights)) for p, m_b, u in zip(problems, means, updates))
    c = -sum(float(m_b @ ab) for m_b, ab in zip(means, a))
    s = s0 / (1.0 + c)
    log.info("coupled mean step: s0 = %.4g, c = %.4g", s0, c)
    for u, ab in zip(updates, a):
        u.weights = u.weights + s * ab


def scale_block_steps(problems: list[BlockProblem], supports: list[np.ndarray], updates: list) -> list[float]:
    """Scale each block's update by its τ_b from the blocks' joint quadratic model (in place); the τ_b."""
    taus = block_step_sizes(problems, supports, [u.weights for u in updates])
    for p, sup, u, t in zip(problems, supports, updates, taus):
        m = np.where(sup, p.weights, 0.0)
        u.weights = m + t * (u.weights - m)
    log.info("block steps: %s", " ".join(f"{t:.3g}" for t in taus))
    return [float(t) for t in taus]


def plain_updates(problems: list[BlockProblem], supports: list[np.ndarray]) -> list:
    """The CBS-U updates of the same supports without the gradient term (``newton_step_only``'s start)."""
    return batched_update([p.with_gradient(None) for p in problems], supports)
