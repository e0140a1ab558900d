"""A CIFAR-10 ResNet-8 with option-A shortcuts, as a user of ``cbs prune`` would write it.

    cbs prune --model examples/resnet_cifar_a.py:model --data examples/resnet_cifar_a.py:data \\
              --checkpoint examples/resnet_cifar_a.pt ...

The network follows He et al. (2016), section 4.2: conv3x3(3->16)-BN-ReLU, three stages of one
BasicBlock each (16, 32, 64 channels; strides 1, 2, 2), global average pool, fc(64->10) with bias.
A BasicBlock is conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU. The shortcut is OPTION A:
the identity, and where the shape changes a stride-2 subsampling with the extra channels zero-padded,
so it has no parameters (unlike the option-B 1x1 conv + BN of the shared ResNet20).

``data()`` reads the CIFAR-10 .npz files lazily: it keeps the uint8 arrays and normalises each item
on the fly with the standard CIFAR-10 mean/std (not the 0.5/0.5 of the shared ResNet20 checkpoint).
The data folder is $CBS_DATA_DIR, else ../shared/data relative to the current directory.

``python examples/resnet_cifar_a.py [--epochs 6] [--out examples/resnet_cifar_a.pt]`` trains it
(SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4, batch 128, random crop with 4-pixel zero padding
and horizontal flip, seed 0, one thread) and saves {"state_dict": ..., "epoch": E}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # extra channels of the shortcut, zero-padded

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad > 0:
            half = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetA(nn.Module):
    """CIFAR ResNet with option-A shortcuts; depth = 6 * blocks_per_stage + 2."""

    def __init__(self, blocks_per_stage: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class CifarNpz(torch.utils.data.Dataset):
    """A CIFAR-10 split read from an .npz file, kept as uint8 and normalised per item on the fly."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as z:
            self.data = np.ascontiguousarray(z["data"].reshape(-1, 3, 32, 32))  # uint8 NCHW
            self.labels = z["labels"].astype(np.int64)
        self.mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, 32, 32) -> float32 normalised with the standard CIFAR-10 mean/std."""
        return (pixels.float() / 255.0 - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalise(torch.from_numpy(self.data[i])), int(self.labels[i])


def data_dir() -> Path:
    """$CBS_DATA_DIR if set, else ../shared/data relative to the current directory."""
    env = os.environ.get("CBS_DATA_DIR")
    root = Path(env) if env else Path.cwd() / ".." / "shared" / "data"
    folder = root / "cifar10"
    for name in ("cifar10_train.npz", "cifar10_test.npz"):
        if not (folder / name).is_file():
            source = "$CBS_DATA_DIR" if env else "../shared/data (relative to the current directory)"
            raise FileNotFoundError(
                f"CIFAR-10 file {folder / name} not found. Set CBS_DATA_DIR to a folder holding "
                f"cifar10/{name}, or run from a directory where {source} has it."
            )
    return folder


def model() -> nn.Module:
    """ResNet-8 (one BasicBlock per stage) with option-A shortcuts, randomly initialised."""
    return ResNetA(blocks_per_stage=1)


def data() -> tuple[CifarNpz, CifarNpz]:
    """(train, test): map-style datasets of (normalised float32 (3, 32, 32), int label)."""
    folder = data_dir()
    return CifarNpz(folder / "cifar10_train.npz"), CifarNpz(folder / "cifar10_test.npz")


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding (in pixel space, i.e. black) and horizontal flip of a
    uint8 batch (N, 3, 32, 32); the result is still uint8 and is normalised afterwards."""
    n = pixels.shape[0]
    padded = F.pad(pixels, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(pixels)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        out[i] = crop.flip(2) if flip[i] else crop
    return out


@torch.no_grad()
def evaluate(net: nn.Module, test: CifarNpz, batch: int = 1000) -> float:
    net.eval()
    correct = 0
    labels = torch.from_numpy(test.labels)
    for i in range(0, len(test), batch):
        x = test.normalise(torch.from_numpy(test.data[i : i + batch]))
        x = x.contiguous(memory_format=torch.channels_last)
        correct += int((net(x).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--max-batches", type=int, default=None,
                        help="stop each epoch after this many batches (to time an epoch)")
    parser.add_argument("--out", default="examples/resnet_cifar_a.pt")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train, test = data()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    per_epoch = -(-len(train) // args.batch)
    if args.max_batches is not None:
        per_epoch = min(per_epoch, args.max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * per_epoch)
    pixels = torch.from_numpy(train.data)
    labels = torch.from_numpy(train.labels)
    for epoch in range(1, args.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        total_loss, seen = 0.0, 0
        for b in range(per_epoch):
            idx = order[b * args.batch : (b + 1) * args.batch]
            x = train.normalise(augment(pixels[idx], gen)).contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
        train_time = time.perf_counter() - t0
        acc = evaluate(net, test)
        print(f"epoch {epoch}/{args.epochs}: train loss {total_loss / seen:.4f}, test accuracy {100 * acc:.2f} %, "
              f"{seen} images in {train_time:.1f} s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(args.out) + ".tmp")
        torch.save({"state_dict": net.state_dict(), "epoch": epoch}, tmp)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
