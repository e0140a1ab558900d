"""SparseGPT (Algorithm 1) with lazy batched updates against its direct transcription, and its basic facts."""

from __future__ import annotations

import numpy as np
import pytest

from formulations.patterns import pattern_violation
from formulations.sparsegpt import sparsegpt, sparsegpt_reference, upper_inverse_factor


def _layer(seed: int, d_out: int = 6, d_in: int = 20, T: int = 60):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(T, d_in)) @ rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)  # correlated inputs
    H = A.T @ A / T
    H += 0.01 * np.mean(np.diag(H)) * np.eye(d_in)
    return rng.normal(size=(d_out, d_in)), H


def test_upper_inverse_factor():
    _, H = _layer(0)
    U = upper_inverse_factor(H)
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(H), rtol=1e-9, atol=1e-12)
    assert np.allclose(U, np.triu(U))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity,pattern,block,mask_block", [
    (0.5, None, 8, 8), (0.7, None, 8, 4), (0.3, None, 128, 128), (None, (2, 4), 8, 4), (None, (1, 4), 4, 4),
])
def test_lazy_batched_updates_equal_the_direct_transcription(seed, sparsity, pattern, block, mask_block):
    W, H = _layer(seed)
    fast, kept = sparsegpt(W, H, sparsity or 0.5, pattern, block=block, mask_block=mask_block)
    slow, kept_ref = sparsegpt_reference(W, H, sparsity or 0.5, pattern, mask_block=mask_block)
    assert np.array_equal(kept, kept_ref)
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert np.all(fast[~kept] == 0)
    if pattern is not None:
        assert all(pattern_violation(row, pattern) is None for row in kept)


def test_facts_of_the_method():
    W, H = _layer(7)
    same, kept = sparsegpt(W, H, 0.0)
    assert kept.all() and np.allclose(same, W)
    # the compensation helps: error (V − W) H (V − W)ᵀ below plain masking of the same mask
    V, kept = sparsegpt(W, H, 0.5, block=8)
    masked = np.where(kept, W, 0.0)
    err = lambda X: float(np.einsum("oi,ij,oj->", X - W, H, X - W))  # noqa: E731
    assert err(V) < err(masked)
    # with a diagonal H the scores are w² · H_jj, compensation moves nothing
    D = np.diag(np.linspace(1, 3, 20))
    V, kept = sparsegpt(W, D, 0.5, block=20)
    assert np.allclose(V, np.where(kept, W, 0.0))
    scores = W ** 2 * np.diag(D)
    assert (scores[~kept].max() <= scores[kept].min())
