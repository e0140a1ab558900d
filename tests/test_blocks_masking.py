"""Blocks, budget allocation, and the transactional mask edit."""

import numpy as np
import pytest
import torch
from torch import nn

from engine.blocks import make_blocks
from engine.errors import InvalidOptionError
from engine.masking import apply_pruning, current_masks, make_permanent, sparsity
from formulations.allocation import allocate_global, allocate_uniform, n_keep_for
from formulations.errors import InvalidProblemError

SHAPES = [torch.Size([4, 5]), torch.Size([3, 4])]
NAMES = ["a.weight", "b.weight"]


def test_block_modes_cover_every_weight_once():
    for mode, size in [("layer", None), ("whole", None), ("row", None), ("chunk", 7)]:
        blocks = make_blocks(NAMES, SHAPES, mode, size)
        seen = {n: np.zeros(int(np.prod(s)), int) for n, s in zip(NAMES, SHAPES)}
        for b in blocks:
            for name, start, stop, _ in b.segments:
                seen[name][start:stop] += 1
        assert all((v == 1).all() for v in seen.values()), mode
    assert len(make_blocks(NAMES, SHAPES, "row")) == 4 + 3
    assert [b.n for b in make_blocks(NAMES, SHAPES, "chunk", 7)] == [7, 7, 6, 7, 5]


def test_block_gather_matches_flat_order():
    blocks = make_blocks(NAMES, SHAPES, "whole")
    tensors = {n: torch.arange(int(np.prod(s)), dtype=torch.float32).reshape(s) + 100 * i
               for i, (n, s) in enumerate(zip(NAMES, SHAPES))}
    values = blocks[0].gather_values(tensors)
    assert values.shape == (32,) and values[20] == 100
    rows = {n: t.reshape(1, -1).repeat(2, 1) for n, t in tensors.items()}
    assert torch.equal(blocks[0].gather_columns(rows)[0], values)


def test_block_scatter_inverts_gather_and_keeps_each_dtype():
    for mode, size in (("whole", None), ("row", None), ("chunk", 7)):
        flat = {n: torch.zeros(int(np.prod(s)), dtype=torch.float32) for n, s in zip(NAMES, SHAPES)}
        for i, b in enumerate(make_blocks(NAMES, SHAPES, mode, size)):
            values = torch.arange(b.n, dtype=torch.float64) + 1000 * i
            b.scatter(flat, values)
            assert torch.equal(b.gather_values(flat), values.float())
        assert all(t.dtype == torch.float32 and (t != 0).sum() >= t.numel() - 1 for t in flat.values())
    with pytest.raises(InvalidOptionError, match=r"'values'.*Block.scatter\(\).*32 values.*\(31,\)"):
        make_blocks(NAMES, SHAPES, "whole")[0].scatter(flat, torch.zeros(31))


def test_block_options_rejected():
    with pytest.raises(InvalidOptionError, match="'block_mode'.*layer, whole, chunk, row.*'x'"):
        make_blocks(NAMES, SHAPES, "x")
    with pytest.raises(InvalidOptionError, match="'block_size'"):
        make_blocks(NAMES, SHAPES, "chunk", 0)


def test_allocations_sum_to_budget():
    rng = np.random.default_rng(0)
    scores = [rng.random(10), rng.random(3), rng.random(7)]
    for K in (0, 1, 9, 20):
        ks = allocate_global(scores, K)
        assert sum(ks) == K and all(0 <= k <= s.size for k, s in zip(ks, scores))
        flat = np.concatenate(scores)
        thr = np.sort(flat)[::-1][K - 1] if K else np.inf
        assert ks == [int((s >= thr).sum()) for s in scores]
        ku = allocate_uniform([10, 3, 7], K)
        assert sum(ku) == K
    assert n_keep_for(1000, 0.9) == 100
    with pytest.raises(InvalidProblemError, match="'n_keep'"):
        allocate_global(scores, 21)
    with pytest.raises(InvalidProblemError, match="'n_keep'"):
        allocate_uniform([1, 2], -1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))


def test_apply_pruning_writes_masks_and_weights():
    m = _model()
    new = {"0.weight": torch.ones(4, 5), "2.weight": torch.full((3, 4), 2.0)}
    masks = {"0.weight": torch.rand(4, 5) > 0.5, "2.weight": torch.ones(3, 4, dtype=torch.bool)}
    apply_pruning(m, new, masks)
    assert torch.equal(m[0].weight, masks["0.weight"].float())
    assert torch.equal(current_masks(m)["0.weight"], masks["0.weight"])
    assert abs(sparsity(m, ["0.weight"]) - (1 - masks["0.weight"].double().mean().item())) < 1e-12
    make_permanent(m)
    assert current_masks(m) == {} and torch.equal(m[0].weight, masks["0.weight"].float())


def test_apply_pruning_is_all_or_nothing():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    new = {"0.weight": torch.ones(4, 5), "2.weight": torch.ones(3, 4)}
    masks = {"0.weight": torch.ones(4, 5, dtype=torch.bool), "2.weight": torch.ones(3, 4, dtype=torch.bool)}
    # the second write fails (a weight that cannot be multiplied into shape); the first must be undone
    new["2.weight"] = torch.ones(3, 4, 2)
    masks["2.weight"] = torch.ones(3, 4, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        apply_pruning(m, new, masks)
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_apply_pruning_rejects_missing_mask():
    with pytest.raises(InvalidOptionError, match="'masks'"):
        apply_pruning(_model(), {"0.weight": torch.ones(4, 5)}, {})
