"""IAU: influence-approximation unlearning for torch classifiers.

Paper: "Efficient Machine Unlearning via Influence Approximation" (arXiv 2507.23257); code: Lolo1222/IAU.

We follow the released code (`IAU_unlearn.py`): with a fresh Adam optimizer, one step on
``grad mean CE(remaining) - grad mean CE(forget)``. Adam's first step is exactly
``-lr * g / (|g| + eps)`` (bias-corrected m = g, v = g^2), so the update is a fixed direction `d` times lr.

Step size: the code's fixed lr = 1e-3 forgets nothing on an MNIST MLP and overshoots on a small CNN (the step
that matches retraining there is several times smaller; README, classifier benchmark), so the step is calibrated
per request instead: a bisection on log(lr) in [`lr_min`, `lr_max`] for the smallest lr at which the forget rows
look like rows the model never saw, never taking a step that costs more than `max_retain_drop` accuracy on a
probe of remaining rows. Each trial is one forward pass over the forget rows and that probe.
`calibrate = false` gives the code's behaviour (one step of `lr`).

Criterion (`criterion`, default "accuracy"): forgotten enough once forget accuracy is at most what a model that
never saw the rows would score: the held-out (test) accuracy before the step for sample ids, 0 for a whole class
(a model never trained on a class never predicts it). "loss" (forget mean loss reaches held-out mean loss) is
kept as an option; a few confidently wrong rows inflate a mean loss long before the accuracy moves, so it
stops class forgetting far too early.

Cost: the remaining-set gradient is O(training set); everything else is O(forget set + probes). With
`cached_gradient = true` (the default) the engine keeps, per model, the sum of per-row gradients over the
remaining rows *at the current weights*, so a request derives its remaining-set gradient exactly as
``(S - k * g_forget) / (n - k)``. After each request the sum for the new weights is computed in a background
thread, off the request path; a request that arrives before it is done waits for it. The cache is only used
when it describes exactly the target's weights (the same module object) and its forgotten set, so it is never
stale: a restart, a rollback or a version built elsewhere is simply a miss, and that request computes the
gradient itself. (An earlier cache that was reused across versions, stale, collapsed the model to chance
within a few sequential requests.)
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import Forget, check_fields, register
from adapters.classifier import measures
from adapters.classifier.model import (
    ClassifierEngine,
    ClassifierTarget,
    WeightChange,
    copy_of,
    mean_loss_grad,
    state_of,
)
from adapters.datasets import LabeledSet
from adapters.devices import device_of


@dataclasses.dataclass
class IAUConfig:
    lr: float = 1e-3  # the released code's Adam lr: the step taken when calibrate = false
    calibrate: bool = True
    lr_min: float = 1e-5  # calibration searches the step in [lr_min, lr_max] (bisection on log lr)
    lr_max: float = 1e-2
    calibration_steps: int = 7  # bisection steps: the step is found within a factor (lr_max / lr_min) ** 2**-steps
    max_retain_drop: float = 0.02  # never take a step that costs more retain accuracy than this (on a probe)
    cached_gradient: bool = True  # keep the remaining-set gradient of the current version (module docstring)
    measure_cap: int = 256  # rows of retain/test for the calibration guard and the result measures
    forget_probe_cap: int = 512  # forget rows the calibration judges the criterion on (all, up to this many)
    criterion: Literal["accuracy", "loss"] = "accuracy"  # when the calibrated step has forgotten enough
    adam_eps: float = 1e-8

    def __post_init__(self):
        check_fields(self, positive=("lr", "lr_min", "lr_max", "calibration_steps", "measure_cap", "forget_probe_cap",
                                     "adam_eps"), fractions=("max_retain_drop",))
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min: must be below lr_max ({self.lr_max}), not {self.lr_min}")


@dataclasses.dataclass
class _GradCache:
    """What a request needs from one version: taken at exactly these weights and this remaining set."""

    model: nn.Module  # identity of the version described (a strong reference keeps `is` meaningful)
    forgotten: frozenset[int]
    grad_sum: list[torch.Tensor]  # sum over the remaining rows of per-row mean-CE gradients (on the model's device)
    n: int  # remaining rows
    test_acc: float  # held-out accuracy of this version on the test probe (the criterion's reference)


@register
class IAUEngine(ClassifierEngine):
    name = "iau"
    Config = IAUConfig
    coalescable = True

    def __init__(self, config: IAUConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._cache: dict[str, list[Future]] = {}  # model name -> futures of _GradCache, newest last
        self._lock = threading.Lock()
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iau-refresh")

    # --- one request --------------------------------------------------------------------------------------

    def apply(self, target: ClassifierTarget, forget: Forget, progress: Callable[[dict], None] | None = None
              ) -> WeightChange:
        t0 = time.perf_counter()
        cfg = self.config
        forget_rows, remaining, skipped = target.split(forget)
        # The rows every trial step reads go to the model's device once; the remaining set (read once, for its
        # gradient) moves a batch at a time.
        device = device_of(target.model)
        forget_rows = forget_rows.to(device)
        retain_probe = remaining.sample(cfg.measure_cap).to(device)
        test_probe = target.data.test.sample(cfg.measure_cap).to(device)

        model = target.copy_model()
        cache = self._cached(target)
        g_forget, forget_logits = _mean_grad_and_logits(model, forget_rows)
        if cache is not None:
            k = len(forget_rows)
            g_remain = [(s - k * gf) / (cache.n - k) for s, gf in zip(cache.grad_sum, g_forget, strict=True)]
            test_before = cache.test_acc
        else:
            g_remain = mean_loss_grad(model, remaining)
            test_before = measures.accuracy(model, test_probe)
        # Adam's first step from a fresh optimizer: the direction is -g / (|g| + eps), scaled by lr.
        direction = [-(gr - gf) / ((gr - gf).abs() + cfg.adam_eps) for gr, gf in zip(g_remain, g_forget, strict=True)]
        before = {"forget_acc": _acc(forget_logits, forget_rows.y),
                  "retain_acc": measures.accuracy(model, retain_probe), "test_acc": test_before}

        step = _Step(model, direction, forget_rows.sample(cfg.forget_probe_cap), retain_probe)
        if cfg.calibrate:
            chosen = self._calibrate(step, self._reached(target, forget, forget_rows, test_probe, test_before),
                                     before["retain_acc"])
        else:
            chosen = cfg.lr
        probe_forget_acc, retain_acc = step.evaluate(chosen)  # the weights of the chosen step (measured already)
        forget_acc = probe_forget_acc if step.k == len(forget_rows) else measures.accuracy(model, forget_rows)
        after = {"forget_acc": forget_acc, "retain_acc": retain_acc, "test_acc": measures.accuracy(model, test_probe)}
        metrics = {
            **measures.before_after(before, after),
            "forgotten": float(len(forget_rows)),
            "already_forgotten": float(len(skipped)),
            "step_lr": chosen,
            "gradient_cached": float(cache is not None),
            "engine_seconds": time.perf_counter() - t0,
        }
        if cfg.cached_gradient:  # the next request's gradient, computed off the request path
            self._refresh(target.name, target.spec, model, target.forgotten | frozenset(forget_rows.ids.tolist()),
                          remaining, target.data.test.sample(cfg.measure_cap))
        return WeightChange(state_of(model), metrics, model=model, forgotten_ids=tuple(forget_rows.ids.tolist()))

    def _calibrate(self, step: _Step, reached, retain_before: float) -> float:
        """Smallest lr in [lr_min, lr_max] whose step reaches the criterion without costing more than
        max_retain_drop retain accuracy; if none reaches it, the largest step within the guard."""
        cfg = self.config
        lo, hi = math.log(cfg.lr_min), math.log(cfg.lr_max)
        reached_at, within_guard = None, None
        for _ in range(cfg.calibration_steps):
            lr = math.exp((lo + hi) / 2)
            forget_acc, retain_acc = step.evaluate(lr)
            if retain_acc < retain_before - cfg.max_retain_drop:
                hi = math.log(lr)  # too much damage: smaller steps only
            elif reached(step.model, forget_acc):
                hi, reached_at = math.log(lr), lr
            else:
                lo, within_guard = math.log(lr), lr
        return reached_at or within_guard or cfg.lr_min

    def _reached(self, target, forget, forget_rows, test_probe, test_before):
        """When a step has forgotten enough: the forget rows look like rows the model never saw."""
        if self.config.criterion == "loss":
            held_out_loss = measures.mean_loss(target.model, test_probe)
            return lambda model, _acc: measures.mean_loss(model, forget_rows) >= held_out_loss
        # Never-seen samples of seen classes score like held-out rows; a never-seen class is never predicted.
        reference = 0.0 if forget.kind == "class" else test_before
        return lambda _model, forget_acc: forget_acc <= reference

    # --- the cached remaining-set gradient -----------------------------------------------------------------

    def _cached(self, target: ClassifierTarget) -> _GradCache | None:
        """The cache for exactly the target's weights and forgotten set, waiting for a refresh in flight."""
        if not self.config.cached_gradient:
            return None
        with self._lock:
            futures = list(self._cache.get(target.name, ()))
        for future in reversed(futures):
            if future.cancelled() or future.exception() is not None:  # exception() waits for one in flight
                continue
            cache = future.result()
            if cache.model is target.model and cache.forgotten == target.forgotten:
                return cache
        return None

    def _refresh(self, name: str, spec: dict, model: nn.Module, forgotten: frozenset[int], remaining: LabeledSet,
                 test_probe: LabeledSet) -> None:
        """Compute the cache for `model` (the version this request produced) in the background."""
        snapshot = copy_of(spec, model)  # the refresh never touches the module the daemon serves and copies

        def compute() -> _GradCache:
            grads = mean_loss_grad(snapshot, remaining)
            return _GradCache(model, forgotten, [g * len(remaining) for g in grads], len(remaining),
                              measures.accuracy(snapshot, test_probe))

        with self._lock:
            futures = self._cache.setdefault(name, [])
            for older in futures:
                older.cancel()  # not started yet: its version is already superseded
            futures.append(self._refresher.submit(compute))
            del futures[:-2]  # the newest, and the one before (a change that fails to commit must not evict it)

    def warm_cache(self, target: ClassifierTarget) -> None:
        """Compute the cache for the target's active version now and wait for it (e.g. right after a version is
        registered, or in a benchmark before timing a request)."""
        if self.config.cached_gradient:
            remaining = target.remaining
            self._refresh(target.name, target.spec, target.model, target.forgotten, remaining,
                          target.data.test.sample(self.config.measure_cap))
            self.wait_for_refresh()

    def wait_for_refresh(self) -> None:
        """Block until every background refresh submitted so far has finished."""
        with self._lock:
            futures = [f for fs in self._cache.values() for f in fs]
        for future in futures:
            if not future.cancelled():
                future.result()

    def forget_cache(self, model_name: str) -> None:
        """Drop a model's cached gradients (after a rollback they describe another lineage)."""
        with self._lock:
            for future in self._cache.pop(model_name, []):
                future.cancel()


class _Step:
    """theta0 + lr * direction, evaluated on the forget rows and a retain probe in one forward pass (once per lr:
    the step finally taken is one the calibration measured)."""

    def __init__(self, model: nn.Module, direction: list[torch.Tensor], forget_rows: LabeledSet,
                 retain_probe: LabeledSet):
        self.model = model
        self.params = list(model.parameters())
        self.theta0 = [p.detach().clone() for p in self.params]
        self.direction = direction
        self.x = torch.cat([forget_rows.x, retain_probe.x])
        self.y = torch.cat([forget_rows.y, retain_probe.y])
        self.k = len(forget_rows)
        self._measured: dict[float, tuple[float, float]] = {}

    @torch.no_grad()
    def evaluate(self, lr: float) -> tuple[float, float]:
        """Set the weights to the step of size lr; (forget accuracy, retain-probe accuracy) there."""
        for p, p0, d in zip(self.params, self.theta0, self.direction, strict=True):
            torch.add(p0, d, alpha=lr, out=p)
        if lr not in self._measured:
            self.model.eval()
            correct = self.model(self.x).argmax(1) == self.y
            retain = correct[self.k:]
            self._measured[lr] = (float(correct[:self.k].float().mean()),
                                  float(retain.float().mean()) if len(retain) else 1.0)
        return self._measured[lr]


def _mean_grad_and_logits(module: nn.Module, rows: LabeledSet, batch_size: int = 2048
                          ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of the mean CE over `rows` and the logits it was taken at (one forward pass for both)."""
    module.eval()
    params = list(module.parameters())
    total, logits = [torch.zeros_like(p) for p in params], []
    device = device_of(module)
    for start in range(0, len(rows), batch_size):
        out = module(rows.x[start:start + batch_size].to(device))
        loss = F.cross_entropy(out, rows.y[start:start + batch_size].to(device), reduction="sum") / len(rows)
        for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc += g
        logits.append(out.detach())
    return total, torch.cat(logits)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())
