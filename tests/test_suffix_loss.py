"""The per-block losses of ``cbs`` run only the suffix of the forward pass (engine.losses.PrefixLoss):
the models' forward chains against their forward passes, and every block's masked loss against a full
forward pass of a masked copy (the oracle), including the weights being restored after each call."""

import copy

import numpy as np
import pytest
import torch

from engine.blocks import make_blocks
from engine.models import build_model, forward_chain, prunable_parameters, small_mlp
from engine.losses import BlockLoss, PrefixLoss, mean_loss


def _inputs(name, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (count, 3, 32, 32) if name == "resnet20" else (count, 1, 28, 28)
    return torch.randn(shape, generator=gen), torch.randint(0, 10, (count,), generator=gen)


@pytest.mark.parametrize("name", ["resnet20", "mlpnet"])
def test_forward_chain_composes_to_forward_and_owns_every_parameter_once(name):
    model = build_model(name, seed=1)
    x, _ = _inputs(name, 7)
    chain = forward_chain(model)
    h = x
    for fn, _ in chain:
        h = fn(h)
    with torch.no_grad():
        assert torch.equal(h, model(x))
    owned = [i for _, ids in chain for i in ids]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    assert len(set(owned)) == len(owned)


def test_a_model_without_a_chain_gets_the_whole_pass():
    net = small_mlp(8, (6,), 3)
    seq = torch.nn.Sequential(torch.nn.Flatten(), net.fc1, torch.nn.ReLU(), net.fc2)
    assert forward_chain(seq) is None
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    loss = PrefixLoss(seq, x, y)
    assert loss.first_part([net.fc2.weight]) == 0
    assert loss(0) == mean_loss(seq, x, y)


def _masked_copy_loss(model, block, support, x, y):
    """Oracle: the full forward pass of a copy whose block weights outside ``support`` are zero."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    offset = 0
    with torch.no_grad():
        for pname, start, stop, _ in block.segments:
            seg = params[pname].data.view(-1)[start:stop]
            seg.mul_(torch.from_numpy(support[offset : offset + stop - start]).to(seg.dtype))
            offset += stop - start
    return mean_loss(ref, x, y)


@pytest.mark.parametrize("name,preset", [("resnet20", "default"), ("mlpnet", "default")])
def test_every_block_loss_equals_the_full_pass_of_a_masked_copy(name, preset):
    model = build_model(name, seed=2)
    names = [n for n, _ in prunable_parameters(model, preset)]
    params = dict(model.named_parameters())
    blocks = make_blocks(names, [params[n].shape for n in names], "layer")
    # 300 images: two batches of the loss (256 + 44), so the cache holds more than one batch
    x, y = _inputs(name, 300)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = PrefixLoss(model, x, y)
    rng = np.random.default_rng(0)
    # blocks out of model order, each twice: the one cache slot is refilled and reused
    order = list(rng.permutation(len(blocks))) + list(range(len(blocks)))
    parts = set()
    for b in order:
        block = blocks[b]
        evaluate = BlockLoss(model, block, np.arange(block.n), prefix)
        parts.add(evaluate.part)
        support = rng.random(block.n) < 0.5
        got = evaluate(support)
        assert got == _masked_copy_loss(model, block, support, x, y), block.label
        for k, v in model.state_dict().items():  # the block's weights are restored after the call
            assert torch.equal(v, state[k]), k
    # the blocks really start at different parts (ResNet20: stem, the nine BasicBlocks and the head)
    assert len(parts) == (11 if name == "resnet20" else 3)
