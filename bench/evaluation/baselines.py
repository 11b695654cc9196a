"""Reference methods for the classifier benchmark, not served engines (never registered).

- `retrain`: train a fresh model (same spec, same init seed, same recipe) on the remaining rows only: the gold
  standard every method is measured against.
- `finetune`: keep training the current model on the remaining rows for a few epochs ("FT" in SalUn's tables);
  forgetting comes only from catastrophic forgetting.
- `gradient_ascent`: raise the cross-entropy of the forget rows ("GA"), stopping once they score no better than
  held-out rows, so it is not left to run until the model is destroyed.

Each takes what it needs explicitly and returns a new module; none mutates the model it is given.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from adapters.classifier import measures
from adapters.classifier import model as classifier
from adapters.datasets import LabeledSet


def retrain(spec: dict, remaining: LabeledSet, *, epochs: int, alpha: float = 0.005, seed: int = 0) -> nn.Module:
    """A fresh model trained on `remaining` only (alpha > 0: IAU's gradient restriction, 0: plain training)."""
    return classifier.train_gr(classifier.build(spec), remaining, epochs=epochs, alpha=alpha, seed=seed)


def finetune(model: nn.Module, remaining: LabeledSet, *, epochs: int = 2, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Continue plain training (Adam) on the remaining rows."""
    return classifier.train_gr(copy.deepcopy(model), remaining, epochs=epochs, alpha=0.0, lr=lr, seed=seed)


def gradient_ascent(model: nn.Module, forget: LabeledSet, *, reference_acc: float, epochs: int = 5,
                    lr: float = 1e-2, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """SGD ascent on the forget rows' CE; stops at the first step where forget accuracy <= `reference_acc`."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(forget), generator=g)
        for start in range(0, len(forget), batch_size):
            idx = order[start:start + batch_size]
            model.train()
            loss = -F.cross_entropy(model(forget.x[idx]), forget.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if measures.accuracy(model, forget) <= reference_acc:
                return model.eval()
    return model.eval()
