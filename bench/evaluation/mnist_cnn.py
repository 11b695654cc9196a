"""The benchmark's MNIST judge: a CNN that reads generated digits, used only for evaluation.

Two conv blocks (32 then 64 channels, batch norm, max-pool), a 128-unit penultimate layer (the features FID is
computed in) and a linear head. Trained with AdamW and a one-cycle schedule on the registered training rows at
the DDPM's resolution, with small random shifts. Independent of the served judge (adapters/diffusion/judge.py):
another architecture, another training recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.datasets import LabeledSet


class EvalCNN(nn.Module):
    def __init__(self, resolution: int, num_classes: int = 10, width: int = 32, features: int = 128):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

        self.conv = nn.Sequential(*block(1, width), *block(width, 2 * width), nn.Flatten())
        self.penultimate = nn.Sequential(nn.Linear(2 * width * (resolution // 4) ** 2, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, generator: torch.Generator, k: int) -> torch.Tensor:
    """Each image moved by a random integer offset in [-k, k] along each axis (zero padding)."""
    if k <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (k, k, k, k))
    dx = torch.randint(0, 2 * k + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * k + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def train(rows: LabeledSet, resolution: int, *, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3,
          shift: int = 1, seed: int = 0) -> EvalCNN:
    """Train on `rows` (images in [0, 1] at `resolution`)."""
    torch.manual_seed(seed)
    model = EvalCNN(resolution, int(rows.y.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr / 1.5, weight_decay=1e-4)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(rows), generator=g)
        for start in range(0, len(rows), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(_shift(rows.x[idx], g, shift)), rows.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()
