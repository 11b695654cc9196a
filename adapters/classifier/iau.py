"""IAU: influence-approximation unlearning for torch classifiers.

Paper: "Efficient Machine Unlearning via Influence Approximation" (arXiv 2507.23257); code: Lolo1222/IAU.

We follow the released code (`IAU_unlearn.py`): with a fresh Adam optimizer, one step on
``grad mean CE(remaining) - grad mean CE(forget)``. Adam's first step is exactly
``-lr * g / (|g| + eps)`` (bias-corrected m = g, v = g^2), so the update is a fixed direction `d` times lr.

Step size: the code's fixed lr = 1e-3 forgets nothing on an MNIST MLP and overshoots on a small CNN (the step
that matches retraining there is several times smaller; README, classifier benchmark), so the step is calibrated
per request instead: a search of [`lr_min`, `lr_max`] for the smallest lr at which the forget rows look like rows
the model never saw, to the precision of `calibration_steps` bisection steps on log(lr), never taking a step
that costs more than `max_retain_drop` accuracy on a probe of remaining rows, nor one that leaves the model more
than that below the version its lineage started from (retain_budget.py). Each trial is one forward pass over
the forget rows; the probe is read at the step the search settles on (and, only where that step costs too much,
at the few smaller ones that find the largest within the guard). A criterion whose margin moves smoothly with lr
(a mean confidence or loss) is searched by interpolating that margin, one that moves in steps (an accuracy) by
bisection (step_search.py).
`calibrate = false` gives the code's behaviour (one step of `lr`).

Criterion (`criterion`): when the forget rows look like rows the model never saw (criteria.py; "confidence" by
default, and a whole class once the model no longer predicts it on any of its rows).

Cost: the remaining-set gradient is O(training set); everything else is O(forget set + probes). With
`cached_gradient = true` (the default) the engine keeps, per model, the sum of per-row gradients over the
remaining rows *at the current weights*, so a request derives its remaining-set gradient exactly as
``(S - k * g_forget) / (n - k)``. After each request the sum for the new weights is computed in a background
thread, off the request path, and so is the sum for the version the daemon loads at start (`prepare`); a request
that arrives before it is done waits for it. The cache is only used when it describes exactly the target's
weights (the same module object) and its forgotten set, so it is never stale: a version the daemon did not make
or load itself (a rollback by the CLI, one built by another replica) is simply a miss, and that request computes
the gradient itself. (An earlier cache that was reused across versions, stale, collapsed the model to chance
within a few sequential requests.) The same refresh keeps every remaining row's own gradient and logits
(row_gradients.py, within `row_gradients_max_mb`), so the forget rows' gradient is a sum too, not a forward and
backward pass on the request path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor

import torch
from torch import nn

from adapters.base import CRITERION_MET, Forget, check_fields, register
from adapters.classifier import measures, row_gradients, step_search
from adapters.classifier.criteria import Criterion, Margin, Scores, unseen_margin
from adapters.classifier.model import (
    ClassifierEngine,
    ClassifierTarget,
    WeightChange,
    copy_of,
    mean_loss_grad,
    state_of,
)
from adapters.classifier.retain_budget import RetainBaseline, retain_floor
from adapters.classifier.trial_step import TrialStep
from adapters.datasets import LabeledSet, RowSelection

GUARD_PRECISION = 1.08  # when the criterion costs more than the guard allows: the largest step within it, to 8 %


@dataclasses.dataclass
class IAUConfig:
    lr: float = 1e-3  # the released code's Adam lr: the step taken when calibrate = false
    calibrate: bool = True
    lr_min: float = 1e-5  # calibration searches the step in [lr_min, lr_max] (bisection on log lr)
    lr_max: float = 1e-2
    calibration_steps: int = 7  # bisection steps: the step is found within a factor (lr_max / lr_min) ** 2**-steps
    max_retain_drop: float = 0.02  # retain accuracy (on a probe) a step may cost, and a lineage (retain_budget.py)
    cached_gradient: bool = True  # keep the remaining-set gradient of the current version (module docstring)
    row_gradients_max_mb: float = 256.0  # with it, each remaining row's gradient if it fits in this (0: never)
    measure_cap: int = 256  # rows of retain/test for the calibration guard and the result measures
    forget_probe_cap: int = 512  # forget rows the calibration judges the criterion on (all, up to this many)
    criterion: Criterion = "confidence"  # when the step has forgotten enough (criteria.py)
    adam_eps: float = 1e-8

    def __post_init__(self):
        check_fields(self, positive=("lr", "lr_min", "lr_max", "calibration_steps", "measure_cap", "forget_probe_cap",
                                     "adam_eps"), fractions=("max_retain_drop",))
        if not self.row_gradients_max_mb >= 0:
            raise ValueError(f"row_gradients_max_mb: must be >= 0, not {self.row_gradients_max_mb!r}")
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min: must be below lr_max ({self.lr_max}), not {self.lr_min}")


@dataclasses.dataclass
class _GradCache:
    """What a request needs from one version: taken at exactly these weights and this remaining set."""

    model: nn.Module  # identity of the version described (a strong reference keeps `is` meaningful)
    forgotten: frozenset[int]
    grad_sum: list[torch.Tensor]  # sum over the remaining rows of per-row mean-CE gradients (on the model's device)
    n: int  # remaining rows
    held_out: Scores  # this version on the test probe (the criterion's reference)
    cpu_seconds: float  # CPU time the refresh thread spent computing it
    rows: row_gradients.RowGradients | None  # each remaining row's gradient and logits, where kept
    spare: nn.Module | None  # a copy of the version no one else holds: the next request's working copy

    def take_spare(self) -> nn.Module | None:
        """The spare copy, once (a second request on the same version copies the module itself)."""
        spare, self.spare = self.spare, None
        return spare


@register
class IAUEngine(ClassifierEngine):
    name = "iau"
    Config = IAUConfig
    coalescable = True
    prepares = True

    def __init__(self, config: IAUConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._cache: dict[str, list[Future]] = {}  # model name -> futures of _GradCache, newest last
        self._baselines: dict[str, Future] = {}  # model name -> RetainBaseline of its lineage (set by prepare)
        self._lock = threading.Lock()
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iau-refresh")

    # --- one request --------------------------------------------------------------------------------------

    def apply(self, target: ClassifierTarget, forget: Forget, progress: Callable[[dict], None] | None = None
              ) -> WeightChange:
        t0 = time.perf_counter()
        cfg = self.config
        # The remaining set is only sampled here (its probe): it is copied out whole off the request path, by the
        # refresh, or by a request with no cache.
        forget_rows, remaining, skipped, retain_probe, test_probe = target.request_rows(forget, cfg.measure_cap)

        cache = self._cached(target)
        with self._lock:
            spare = cache.take_spare() if cache is not None else None
        model = spare if spare is not None else target.copy_model()
        if cache is not None and cache.rows is not None:  # a sum of the rows' own gradients: no pass over them
            g_forget, forget_logits = cache.rows.mean_grad(forget_rows.ids), cache.rows.logits_of(forget_rows.ids)
            forget_entry = None
        else:
            g_forget, forget_logits, forget_entry = TrialStep.forget_gradient(model, forget_rows)
        if cache is not None:
            k = len(forget_rows)
            g_remain = list(torch._foreach_add(cache.grad_sum, g_forget, alpha=-k))  # (S - k g_f) / (n - k)
            torch._foreach_div_(g_remain, cache.n - k)
            held_out = cache.held_out
        else:
            g_remain = mean_loss_grad(model, remaining.rows())
            held_out = Scores.on(model, test_probe)
        direction = _adam_first_step(list(torch._foreach_sub(g_remain, g_forget)), cfg.adam_eps)
        forget_probe = forget_rows.sample(cfg.forget_probe_cap)
        probe_is_all = len(forget_probe) == len(forget_rows)
        step = TrialStep(model, direction, forget_probe, retain_probe, forget_entry if probe_is_all else None)
        forget_before = Scores.of(forget_logits, forget_rows.y)
        if cache is not None and cache.rows is not None:
            step.measured_at_theta0("retain", Scores.of(cache.rows.logits_of(retain_probe.ids), retain_probe.y))
        if probe_is_all:
            step.measured_at_theta0("forget", forget_before)  # the gradient's pass or the cached logits scored them
        before = {"forget_acc": forget_before.accuracy,
                  "retain_acc": step.retain_acc(0.0), "test_acc": held_out.accuracy}
        # a class: no trial may leave a single probed row predicted as it
        margin = unseen_margin(cfg.criterion, forget, held_out, class_forget_max=0.0)
        floor = retain_floor(before["retain_acc"], self._baseline_accuracy(target, retain_probe), cfg.max_retain_drop)
        chosen = self._calibrate(step, margin, floor) if cfg.calibrate else cfg.lr
        probe_forget_acc, retain_acc = step.take(chosen)  # the weights of the chosen step (measured already)
        forget_acc = probe_forget_acc if probe_is_all else measures.accuracy(model, forget_rows)
        after = {"forget_acc": forget_acc, "retain_acc": retain_acc,  # no step: the test probe as scored before
                 "test_acc": measures.accuracy(model, test_probe) if chosen else held_out.accuracy}
        metrics = {
            **measures.before_after(before, after),
            "forgotten": float(len(forget_rows)),
            "already_forgotten": float(len(skipped)),
            "step_lr": chosen,
            "retain_acc_floor": floor,  # the guard: no step leaves less on the retain probe
            CRITERION_MET: float(margin.reached(step.forget_scores(chosen))),  # on the forget probe, as the trials
            "gradient_cached": float(cache is not None),
            "engine_seconds": time.perf_counter() - t0,
        }
        change = WeightChange(state_of(model), metrics, model=model, forgotten_ids=tuple(forget_rows.ids.tolist()))
        if cfg.cached_gradient:  # the next request's gradient, computed off the request path (submitted last)
            self._refresh(target.name, target.spec, model, target.forgotten | frozenset(change.forgotten_ids),
                          remaining, target.data.test.sample(cfg.measure_cap))
        return change

    def _calibrate(self, step: TrialStep, margin: Margin, floor: float) -> float:
        """Smallest lr in [lr_min, lr_max] whose step reaches the criterion, if it leaves at least `floor` retain
        accuracy; otherwise the largest step that does (to within GUARD_PRECISION); 0 (no step)
        if the rows meet the criterion already.

        The search reads the forget rows only: whether a step forgot enough does not depend on what it cost,
        so the search takes the same path whatever the guard says, and the retain probe is read once, at the
        step it found. The damage grows with the step: if the smallest step that forgets enough costs too much,
        every larger one does too, and only then is the guard's edge searched for below it."""
        cfg = self.config
        at_zero = margin.of(step.forget_scores(0.0))
        if at_zero <= 0:
            return 0.0  # the rows already look unseen (e.g. ones the model is unsure of): a retrain would not move
        within_guard = lambda lr: step.retain_acc(lr) >= floor  # noqa: E731
        search = step_search.interpolated if margin.smooth else step_search.bisection
        reached_at, short = search(lambda lr: margin.of(step.forget_scores(lr)), at_zero, cfg.lr_min, cfg.lr_max,
                                   cfg.calibration_steps)
        if reached_at is not None and within_guard(reached_at):
            return reached_at
        # The largest step within the guard instead: below the trial that reached the criterion, which costs too
        # much, or, where none did, below the largest trial if that one costs too much as well.
        outside = reached_at if reached_at is not None else max(short)
        if reached_at is None and within_guard(outside):
            return outside
        return step_search.largest_within(step.retain_acc, step.retain_acc(0.0), floor, cfg.lr_min, outside,
                                          step.retain_acc(outside), GUARD_PRECISION)

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

    def _refresh(self, name: str, spec: dict, model: nn.Module, forgotten: frozenset[int], remaining: RowSelection,
                 test_probe: LabeledSet, baseline: Future | None = None) -> Future:
        """Compute the cache for `model` (the version this request produced) in the background; and, given a
        `baseline` to fill, which of its remaining rows it predicts right (it starts a lineage: prepare)."""

        def compute() -> _GradCache:
            started = time.thread_time()
            # The refresh never touches the module the daemon serves and copies: it takes the gradient on a copy,
            # made here rather than on the request path (nothing writes a version's weights once it is returned).
            snapshot = copy_of(spec, model)
            rows = remaining.rows()  # copied out here, off the request path
            per_row = row_gradients.compute(snapshot, rows) \
                if row_gradients.size_mb(snapshot, len(rows)) <= self.config.row_gradients_max_mb else None
            grad_sum = per_row.total() if per_row is not None else \
                [g * len(rows) for g in mean_loss_grad(snapshot, rows)]
            if baseline is not None:  # before the cache is done: a request that waits for the cache finds it set
                _fill(baseline, forgotten, rows, per_row.logits if per_row is not None else None, snapshot)
            held_out = Scores.on(snapshot, test_probe)
            # The snapshot's weights are the version's, untouched (gradients were taken, not applied): it becomes
            # the next request's working copy, which then need not be built on the request path.
            return _GradCache(model, forgotten, grad_sum, len(rows), held_out, time.thread_time() - started,
                              rows=per_row, spare=snapshot)

        with self._lock:
            futures = self._cache.setdefault(name, [])
            for older in futures:
                older.cancel()  # not started yet: its version is already superseded
            futures.append(future := self._refresher.submit(compute))
            del futures[:-2]  # the newest, and the one before (a change that fails to commit must not evict it)
        return future

    def prepare(self, target: ClassifierTarget, start: ClassifierTarget | None = None) -> None:
        """Compute the cache for the target's version in the background (the daemon calls this when it loads a
        model at start): a request that arrives meanwhile waits for it rather than computing it again. The retain
        budget counts from `start`, the first version of the target's lineage, or from the target itself where
        none is given (retain_budget.py)."""
        baseline: Future = Future()
        with self._lock:
            if (older := self._baselines.pop(target.name, None)) is not None:
                older.cancel()
            self._baselines[target.name] = baseline
        first = start if start is not None else target
        jobs = []
        if start is not None or not self.config.cached_gradient:
            # the baseline from a pass of its own over the first version's remaining rows, on a copy (a module the
            # daemon serves is not touched); the target's refresh fills it otherwise, from the pass it makes anyway
            spec, model, remaining = first.spec, first.model, first.select_remaining()
            jobs.append(self._refresher.submit(lambda: _fill(baseline, first.forgotten, remaining.rows(), None,
                                                             copy_of(spec, model))))
        if self.config.cached_gradient:
            jobs.append(self._refresh(target.name, target.spec, target.model, target.forgotten,
                                      target.select_remaining(), target.data.test.sample(self.config.measure_cap),
                                      baseline if start is None else None))
        # a job cancelled before it ran, or one that failed before it got there, leaves no baseline (no budget)
        # rather than one that requests would wait for forever
        jobs[0].add_done_callback(lambda _: baseline.cancel())

    def _baseline_accuracy(self, target: ClassifierTarget, retain_probe: LabeledSet) -> float | None:
        """The accuracy on `retain_probe` of the version the target's lineage started from, where known."""
        with self._lock:
            baseline = self._baselines.get(target.name)
        if baseline is None:
            return None
        try:  # waits for it, as a request waits for the cache: prepare computes it before any request's refresh
            start = baseline.result()
        except CancelledError:
            return None
        return start.accuracy(target.forgotten, retain_probe)

    def warm_cache(self, target: ClassifierTarget) -> None:
        """prepare(), and wait for it (e.g. in a benchmark before timing a request)."""
        self.prepare(target)
        self.wait_for_refresh()

    def wait_for_refresh(self) -> float:
        """Block until every background refresh submitted so far has finished. Returns the CPU seconds the newest
        of each model took in the refresh thread (a timer around a request or around this wait would also count
        whatever of it ran meanwhile)."""
        with self._lock:
            per_model = [list(fs) for fs in self._cache.values()]
            baselines = list(self._baselines.values())
        for baseline in baselines:
            with contextlib.suppress(CancelledError):
                baseline.exception()
        seconds = 0.0
        for futures in per_model:
            done = [f.result() for f in futures if not f.cancelled()]
            seconds += done[-1].cpu_seconds if done else 0.0
        return seconds

    def forget_cache(self, model_name: str) -> None:
        """Drop a model's cached gradients and its lineage's baseline (after a rollback they describe another
        lineage)."""
        with self._lock:
            futures = self._cache.pop(model_name, [])
            if (baseline := self._baselines.pop(model_name, None)) is not None:
                futures.append(baseline)
            for future in futures:
                future.cancel()


def _fill(baseline: Future, forgotten: frozenset[int], rows: LabeledSet, logits: torch.Tensor | None,
          model: nn.Module) -> None:
    """Set `baseline` to the RetainBaseline of a version (`model`) from its logits for its remaining `rows` (one
    pass over them where not given), unless forget_cache cancelled it meanwhile."""
    if baseline.cancelled():
        return
    result = RetainBaseline.of(forgotten, rows, logits if logits is not None else measures.predict(model, rows))
    with contextlib.suppress(InvalidStateError):  # cancelled since
        baseline.set_result(result)


def _adam_first_step(grads: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """The direction of Adam's first step from a fresh optimizer, -g / (|g| + eps) (the step is lr times it), in
    place over `grads`. torch._foreach_* ops, as torch.optim's own: one call per op for all the tensors, where a
    small model's request would otherwise pay the per-op overhead once per tensor."""
    denominators = torch._foreach_abs(grads)
    torch._foreach_add_(denominators, eps)
    torch._foreach_div_(grads, denominators)
    torch._foreach_neg_(grads)
    return grads
