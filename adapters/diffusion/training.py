"""Training a DDPM from scratch: the loop shared by the demo model's bootstrap and the benchmark's retrain.

AdamW with a short linear warm-up and cosine decay, gradient clipping, label dropout to the null class (for
classifier-free guidance) and an exponential moving average of the weights (diffusers' `EMAModel`), whose
weights are what the loop returns: on short CPU budgets the average samples visibly cleaner than the last step.
The loop reports progress through a callback and stops promptly when asked (a daemon shutting down).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from adapters.diffusion import ddpm


class TrainingStopped(Exception):
    """Training was asked to stop (stop event set) before it finished; nothing was produced."""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # share of labels replaced by the null class (conditional models with one)
    ema_decay: float = 0.999  # 0 disables the average (the last step's weights are returned)
    seed: int = 0


#: on_step(step, total_steps, loss): called after every optimisation step.
ProgressFn = Callable[[int, int, float], None]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: UNet2DModel, spec: ddpm.DDPMSpec, images: torch.Tensor, labels: torch.Tensor | None,
          cfg: TrainConfig, *, on_step: ProgressFn | None = None, stop: threading.Event | None = None
          ) -> UNet2DModel:
    """Train `model` in place on `images` (model space, [-1, 1]) and their labels; returns it in eval mode,
    holding the EMA weights when `cfg.ema_decay` > 0. Raises TrainingStopped if `stop` is set meanwhile."""
    if len(images) == 0:
        raise ValueError("no training images")
    device = next(model.parameters()).device
    images = images.to(device)
    labels = labels.to(device) if labels is not None else None
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    scheduler = ddpm.noise_scheduler(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True) \
        if cfg.ema_decay > 0 else None
    dropout = cfg.label_dropout if spec.conditional and spec.null_class else 0.0
    model.train()
    order, cursor = torch.randperm(len(images), generator=g, device=device), 0
    for step in range(cfg.steps):
        if stop is not None and stop.is_set():
            raise TrainingStopped(f"stopped at step {step} of {cfg.steps}")
        if cursor + cfg.batch_size > len(order):  # epoch boundary: reshuffle
            order, cursor = torch.randperm(len(images), generator=g, device=device), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        y = ddpm.drop_labels(labels[idx], spec, dropout, g) if labels is not None else None
        loss = ddpm.diffusion_loss(model, scheduler, images[idx], y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(model.parameters())
        if on_step is not None:
            on_step(step + 1, cfg.steps, float(loss.detach()))
    if ema is not None:
        ema.copy_to(model.parameters())
    return model.eval()
