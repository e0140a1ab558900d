"""An MLP with biases on the 8x8 digits, as a user of ``cbs prune`` would write it.

    python examples/digits_mlp.py                      # trains in seconds, writes examples/digits_mlp.pt
    cbs prune --model examples/digits_mlp.py:model --data examples/digits_mlp.py:data \\
              --checkpoint examples/digits_mlp.pt ...

Network: 64 -> 128 -> 64 -> 10 with ReLU, every Linear with a bias. The data are scikit-learn's 8x8
digits shipped inside the package (``engine.data.load_digits``: features pixel/16 in [0, 1], a
seeded 1,397 / 400 train/test split), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from engine.data import load_digits


def model() -> nn.Module:
    """The MLP 64 -> 128 -> 64 -> 10 (ReLU, with biases), randomly initialised."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def data() -> tuple[TensorDataset, TensorDataset]:
    """(train, test): TensorDatasets of (float32 (64,), int64 label)."""
    train, test = load_digits("train"), load_digits("test")
    return TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels)


@torch.no_grad()
def accuracy(net: nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits MLP and save its state dict.")
    parser.add_argument("--out", default="examples/digits_mlp.pt")
    parser.add_argument("--steps", type=int, default=1000, help="mini-batch Adam steps")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train, test = data()
    x, y = train.tensors
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    net.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_acc, test_acc = accuracy(net, train), accuracy(net, test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, out)
    print(f"train accuracy {100 * train_acc:.2f} %, test accuracy {100 * test_acc:.2f} % -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
