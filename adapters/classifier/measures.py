"""Measures of what a deletion did, named as the field names them.

forget / retain / test accuracy (UA = 1 - forget accuracy in SalUn's tables). The daemon puts the cheap ones,
on capped samples, into every result event; the benchmarks add the expensive ones (bench/evaluation/mia.py).
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.datasets import LabeledSet
from adapters.devices import device_of


@torch.no_grad()
def predict(model: nn.Module, rows: LabeledSet, batch_size: int = 4096) -> torch.Tensor:
    """The model's logits for `rows`, on the model's device (rows move there a batch at a time)."""
    model.eval()
    device = device_of(model)
    return torch.cat([model(rows.x[i:i + batch_size].to(device)) for i in range(0, len(rows), batch_size)]) \
        if len(rows) else torch.empty(0, device=device)


def accuracy(model: nn.Module, rows: LabeledSet) -> float:
    if len(rows) == 0:
        return float("nan")
    logits = predict(model, rows)
    return float((logits.argmax(1) == rows.y.to(logits.device)).float().mean())


def accuracies(model: nn.Module, forget: LabeledSet, retain: LabeledSet, test: LabeledSet) -> dict[str, float]:
    """forget_acc / retain_acc / test_acc in [0, 1]."""
    return {
        "forget_acc": accuracy(model, forget),
        "retain_acc": accuracy(model, retain),
        "test_acc": accuracy(model, test),
    }


def before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Flatten {"forget_acc": x} pairs into {"forget_acc_before": x, "forget_acc_after": y} for result events."""
    out = {f"{k}_before": v for k, v in before.items()}
    out.update({f"{k}_after": v for k, v in after.items()})
    return out
