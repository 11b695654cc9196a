"""One small supervised loop for causal LMs: prompt -> target pairs, loss on the target tokens only.

Shared by the one-off fact teaching (`bench.evaluation.facts_tuning`) and O3's per-request adapters (`adapters.lm.o3`),
which adds its orthogonality penalty through `extra_loss`. Only parameters with `requires_grad` are trained.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from adapters.lm.loading import encode_pairs, token_logprobs


def fit(model, tokenizer, prompts: list[str], targets: list[str], *, epochs: int, batch_size: int, lr: float,
        seed: int = 0, weight_decay: float = 0.0, max_length: int = 96,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> dict[str, float]:
    """AdamW over the trainable parameters; returns steps, wall and CPU seconds, the last epoch's mean target loss.

    `on_epoch`, if given, gets {"epoch", "epochs", "loss", "elapsed_s", "eta_s"} after each epoch (the ETA
    assumes the remaining epochs take as long as the mean of those done)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    model.train()
    t0, cpu0, steps, epoch_loss = time.perf_counter(), time.process_time(), 0, float("nan")
    for epoch in range(1, epochs + 1):
        rng.shuffle(order)
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            ids, mask, labels = encode_pairs(tokenizer, [prompts[j] for j in idx], [targets[j] for j in idx],
                                             max_length=max_length)
            total, count = token_logprobs(model, ids, mask, labels)
            loss = -total.sum() / count.sum().clamp(min=1)  # mean over target tokens of the batch
            losses.append(loss.item())
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        epoch_loss = sum(losses) / len(losses)
        if on_epoch is not None:
            elapsed = time.perf_counter() - t0
            on_epoch({"epoch": epoch, "epochs": epochs, "loss": epoch_loss, "elapsed_s": elapsed,
                      "eta_s": elapsed / epoch * (epochs - epoch)})
    model.eval()
    # cpu_seconds / threads = the wall time on dedicated cores; shared machines inflate `seconds`
    return {"steps": float(steps), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "last_epoch_loss": epoch_loss}
