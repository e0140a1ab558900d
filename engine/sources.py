"""Data as the engine reads it: a pair of tensors, a map-style ``Dataset`` or a ``DataLoader``, read in batches.

Nothing here holds a whole data set in memory unless the caller passed it as tensors: gradient rows, loss
samples and BatchNorm re-estimation fetch the samples they draw, a batch at a time.

* :class:`Samples` wraps what the user gave. ``draw(count, seed)`` is the first ``count`` entries of a seeded
  permutation of the sample indices (the Fisher samples and the loss samples are prefixes of the same
  permutation, so the smaller set is inside the larger one and both follow from the seed alone). For data
  without random access (a DataLoader over an ``IterableDataset``) the draw is the first ``count`` samples in
  the loader's order, kept as they are read.
* :class:`Drawn` is such a draw: ``rows(start, stop)`` fetches samples ``start:stop`` of it as a collated
  ``(inputs, targets)`` pair. Over tensors it is plain indexing, so results are bit-identical to indexing the
  tensors with the drawn indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .errors import CBSError, InvalidOptionError, describe_value, invalid_option, one_line

__all__ = ["Samples", "Drawn", "as_samples"]


class Samples:
    """A labelled data set: ``(inputs, targets)`` tensors, a map-style Dataset of ``(input, target)`` pairs, or
    a DataLoader of ``(inputs, targets)`` batches. ``name`` says which ("train", "test") in messages."""

    def __init__(self, data: Any, name: str = "train") -> None:
        self.name = name
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dataset: Any = None
        self.collate = default_collate
        self.stream: Any = None  # an iterable DataLoader: read in order, kept as read
        self._read: list[tuple[Any, Any]] = []
        self._iter: Iterator | None = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise invalid_option(name, "Samples", "inputs and targets with the same, non-zero number of rows",
                                     f"{tuple(x.shape)} and {tuple(y.shape)}")
            self.tensors = (x, y)
        elif isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                self.stream = data
            else:
                self.dataset, self.collate = data.dataset, data.collate_fn or default_collate
        elif isinstance(data, IterableDataset):
            self.stream = DataLoader(data, batch_size=None)
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.dataset = data
        else:
            raise invalid_option(name, "the data function", "a Dataset of (input, target) pairs, a DataLoader, or "
                                 "an (inputs, targets) pair of tensors", type(data).__name__)
        if self.dataset is not None and len(self.dataset) == 0:
            raise invalid_option(name, "the data function", "a non-empty data set", "an empty one")

    # ------------------------------------------------------------------ size and access
    def __len__(self) -> int:
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        if self.dataset is not None:
            return len(self.dataset)
        try:
            return len(self.stream.dataset)  # an IterableDataset may know its length
        except TypeError:
            raise invalid_option(self.name, "the data function", "data whose length is known (a map-style "
                                 "Dataset, or an IterableDataset with __len__)", "an IterableDataset without "
                                 "__len__") from None

    @property
    def identity(self) -> tuple:
        """What identifies the data (the objects the user passed), for caches that outlive one call."""
        if self.tensors is not None:
            return ("tensors", id(self.tensors[0]), id(self.tensors[1]))
        return ("dataset", id(self.dataset if self.dataset is not None else self.stream))

    @property
    def random_access(self) -> bool:
        """Whether samples can be fetched by index (tensors or a map-style Dataset)."""
        return self.stream is None

    def draw(self, count: int, seed: int, what: str, skip: int = 0) -> "Drawn":
        """Samples ``skip:skip+count`` of the seeded permutation (see the module docstring)."""
        total = len(self)
        if skip + count > total:
            allowed = f"at most the {total - skip} {self.name} samples" + (f" left after {skip}" if skip else "")
            raise invalid_option(what, "prune()", allowed, count)
        if not self.random_access:
            return Drawn(self, torch.arange(skip, skip + count))
        gen = torch.Generator().manual_seed(seed)
        return Drawn(self, torch.randperm(total, generator=gen)[skip : skip + count])

    def all(self) -> "Drawn":
        """Every sample, in order (evaluation)."""
        return Drawn(self, torch.arange(len(self)) if self.random_access else None)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``index`` as a collated ``(inputs, targets)`` pair."""
        if self.tensors is not None:
            return self.tensors[0][index], self.tensors[1][index]
        if self.dataset is not None:
            items = [self.dataset[int(i)] for i in index]
        else:
            items = self._stream_items(int(index.max()) + 1 if index.numel() else 0)
            items = [items[int(i)] for i in index]
        for item in items[:1]:
            _check_pair(item, self.name)
        try:
            batch = self.collate(items)
        except Exception as exc:  # noqa: BLE001 - a user's data: say what went wrong in one line
            raise CBSError(f"The {self.name} data could not be batched: {one_line(exc)}") from None
        return _pair(batch, self.name)

    def _stream_items(self, count: int) -> list:
        """The first ``count`` samples of an iterable loader, read once and kept."""
        if self._iter is None:
            self._iter = iter(self.stream)
        while len(self._read) < count:
            try:
                batch = next(self._iter)
            except StopIteration:
                raise invalid_option(self.name, "the data function", f"at least {count} samples", len(self._read)) \
                    from None
            x, y = _pair(batch, self.name)
            if self.stream.batch_size is None:  # a loader of single samples
                self._read.append((x, y))
            else:
                self._read += list(zip(x, y))
        return self._read

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample in order, ``batch_size`` at a time (the loader's own batches for an iterable one)."""
        if self.stream is not None:
            for batch in self.stream:
                yield _pair(batch, self.name)
            return
        yield from self.all().batches(batch_size)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of (up to) two samples, to check the data against the model before any work."""
        if self.stream is not None:
            items = self._stream_items(1)[:2]
            return _pair(default_collate(items), self.name)
        return self.take(torch.arange(min(2, len(self))))


class Drawn:
    """Some samples of a :class:`Samples` (``index``; None: every sample in order), fetched on demand."""

    def __init__(self, source: Samples, index: torch.Tensor | None) -> None:
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.source) if self.index is None else int(self.index.numel())

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start:stop`` of the draw as ``(inputs, targets)``."""
        index = torch.arange(start, min(stop, len(self))) if self.index is None else self.index[start:stop]
        return self.source.take(index)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole draw as tensors (for the few hundred or thousand loss samples a run keeps)."""
        return self.rows(0, len(self))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(self), batch_size):
            yield self.rows(s, s + batch_size)


def as_samples(data: Any, name: str) -> Samples:
    """``data`` as :class:`Samples` (itself when it already is one)."""
    return data if isinstance(data, Samples) else Samples(data, name)


def _pair(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        raise invalid_option(name, "the data function", "(input, target) pairs", "dicts (keys "
                             f"{', '.join(map(str, list(batch)[:4]))})")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise invalid_option(name, "the data function", "(input, target) pairs", describe_value(batch))
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise invalid_option(name, "the data function", "(input, target) pairs of tensors or numbers",
                             f"({describe_value(x)}, {describe_value(y)})")
    return x, y


def _check_pair(item: Any, name: str) -> None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InvalidOptionError(f"The '{name}' data must yield (input, target) pairs. Got {describe_value(item)}.")
