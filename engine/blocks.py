"""Blocks: how the prunable weights are split into independent combinatorial problems (DESIGN.md §1).

A block is a list of segments (parameter name, start, stop) of the flattened parameters. Modes:

- ``"layer"``: one block per prunable parameter tensor;
- ``"whole"``: every prunable weight in one block (the CBS paper's setting for MLPNet);
- ``"chunk"``: consecutive chunks of ``block_size`` weights of each flattened parameter (the last chunk of
  a parameter may be shorter); chunks never straddle two parameters;
- ``"row"``: one block per output row (output unit / filter) of each parameter. A parameter stored
  transposed, (in_features, out_features) as GPT-2's ``Conv1D``, is named in ``transposed``: its rows are
  then the columns of the stored tensor.

A segment is (parameter name, start, stop, step) of the flattened parameter: ``flat[start:stop:step]``
(step 1 except for the rows of a transposed weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import invalid_option

__all__ = ["Block", "make_blocks", "BLOCK_MODES"]

BLOCK_MODES = ("layer", "whole", "chunk", "row")


@dataclass(frozen=True)
class Block:
    """A block of weights: ``segments`` = ((parameter name, start, stop, step), ...) in flattened order."""

    label: str
    segments: tuple[tuple[str, int, int, int], ...]

    @property
    def n(self) -> int:
        """Number of weights in the block."""
        return sum(len(range(start, stop, step)) for _, start, stop, step in self.segments)

    def gather_values(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This block's weights (n,) from parameter tensors of any shape (flattened, then sliced)."""
        return torch.cat([tensors[name].reshape(-1)[start:stop:step] for name, start, stop, step in self.segments])

    def scatter(self, flat: dict[str, torch.Tensor], values: torch.Tensor) -> None:
        """Write this block's ``values`` (n,) into flattened per-parameter tensors ``flat`` (1-D, edited in
        place, each keeping its dtype): the inverse of :meth:`gather_values`."""
        if values.shape != (self.n,):
            raise invalid_option("values", "Block.scatter()", f"a 1-D tensor of the block's {self.n} values",
                                 tuple(values.shape))
        offset = 0
        for name, start, stop, step in self.segments:
            size = len(range(start, stop, step))
            flat[name][start:stop:step] = values[offset : offset + size].to(flat[name].dtype)
            offset += size

    def gather_columns(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """This block's columns (N, n) from per-parameter gradient rows (N, numel)."""
        return torch.cat([rows[name][:, start:stop:step] for name, start, stop, step in self.segments], dim=1)


def make_blocks(names: list[str], shapes: list[torch.Size], mode: str = "layer", block_size: int | None = None,
                transposed: frozenset[str] | set[str] = frozenset()) -> list[Block]:
    """Split parameters ``names`` (with ``shapes``) into blocks; see the module docstring for ``mode`` and
    ``transposed``."""
    if mode not in BLOCK_MODES:
        raise invalid_option("block_mode", "make_blocks()", f"one of {', '.join(BLOCK_MODES)}", repr(mode))
    if mode == "chunk":
        if block_size is None or isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise invalid_option("block_size", "make_blocks()", "an integer >= 1 with mode 'chunk'", repr(block_size))
    sizes = [math.prod(s) for s in shapes]
    if mode == "whole":
        return [Block("all", tuple((n, 0, size, 1) for n, size in zip(names, sizes)))]
    blocks = []
    for name, shape, size in zip(names, shapes, sizes):
        if mode == "layer":
            blocks.append(Block(name, ((name, 0, size, 1),)))
        elif mode == "row" and name in transposed and len(shape) == 2:
            # stored (in, out): output unit j is column j, flat[j::out]
            for j in range(shape[1]):
                blocks.append(Block(f"{name}[{j}]", ((name, j, size, shape[1]),)))
        elif mode == "row":
            row = size // shape[0] if len(shape) > 1 else size
            for r in range(0, size, row):
                blocks.append(Block(f"{name}[{r // row}]", ((name, r, r + row, 1),)))
        else:
            for c, s in enumerate(range(0, size, block_size)):
                blocks.append(Block(f"{name}#{c}", ((name, s, min(size, s + block_size), 1),)))
    return blocks
