"""The retain budget (retain_budget.py): IAU's guard counts from the version a model's lineage started at, so
requests that each stop at the per-request cap cannot add up to more."""

import copy
import dataclasses
import threading

import pytest
import torch

from adapters.base import Forget
from adapters.classifier import measures
from adapters.classifier.iau import IAUEngine
from adapters.classifier.retain_budget import RetainBaseline, retain_floor


def test_the_floor_is_the_per_request_cap_without_a_baseline_or_at_or_above_it():
    assert retain_floor(0.95, None, 0.02) == pytest.approx(0.93)
    assert retain_floor(0.95, 0.95, 0.02) == pytest.approx(0.93)
    assert retain_floor(0.97, 0.95, 0.02) == pytest.approx(0.95)  # better than the start: the cap from here


def test_the_floor_spends_what_is_left_of_the_budget_then_allows_no_further_loss():
    assert retain_floor(0.94, 0.95, 0.02) == pytest.approx(0.93)  # one point spent, one left
    assert retain_floor(0.90, 0.95, 0.02) == pytest.approx(0.90)  # spent: a step may cost nothing more


def test_a_baseline_reads_its_versions_accuracy_on_a_later_versions_probe(digits_target):
    rows = digits_target.data.train
    start = RetainBaseline.of(frozenset(), rows, measures.predict(digits_target.model, rows))
    probe = rows.subset(torch.arange(10, 200))
    assert start.accuracy(frozenset({1, 2}), probe) == pytest.approx(measures.accuracy(digits_target.model, probe))
    assert start.accuracy(frozenset(), rows.subset(torch.arange(0))) is None  # nothing to read

    gone = frozenset({3})
    later = RetainBaseline.of(gone, rows.without_ids(gone), measures.predict(digits_target.model,
                                                                             rows.without_ids(gone)))
    assert later.accuracy(frozenset(), probe) is None  # a version that kept row 3: not of this lineage
    assert later.accuracy(gone | {7}, rows.subset(torch.arange(0, 10))) is None  # row 3 is not one of its rows
    assert later.accuracy(gone | {7}, probe) == pytest.approx(measures.accuracy(digits_target.model, probe))


def _damaged(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """The model with noise on its weights: a later version that lost more retain accuracy than the budget."""
    damaged = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return damaged


def test_past_its_lineages_budget_a_version_takes_no_step_that_costs_retain_accuracy(digits_target, random_ids):
    ids = random_ids(len(digits_target.data.train), 60, seed=5)
    budgeted = IAUEngine()
    budgeted.warm_cache(digits_target)  # the lineage starts here (the daemon prepares the version it loads)
    first = budgeted.apply(digits_target, Forget(sample_ids=ids[:20])).metrics
    assert first["retain_acc_floor"] == pytest.approx(first["retain_acc_before"] - 0.02)  # at the start: the cap

    later = dataclasses.replace(digits_target, model=_damaged(digits_target.model, 0.4), version="v7",
                                forgotten=frozenset(ids[:20]))
    forget = Forget(sample_ids=ids[20:])
    spent = budgeted.apply(later, forget).metrics
    assert spent["retain_acc_before"] < first["retain_acc_before"] - 0.04  # well past the budget
    assert spent["retain_acc_floor"] == spent["retain_acc_before"]
    assert spent["retain_acc_after"] >= spent["retain_acc_before"]

    # an engine that never saw the lineage start guards this request alone, and lets it cost retain accuracy
    alone = IAUEngine().apply(later, forget).metrics
    assert alone["retain_acc_floor"] == pytest.approx(alone["retain_acc_before"] - 0.02)
    assert alone["retain_acc_after"] < alone["retain_acc_before"]
    assert spent["step_lr"] < alone["step_lr"]
    budgeted.wait_for_refresh()


def test_a_rollback_ends_the_lineage_and_its_budget(digits_target, random_ids):
    engine = IAUEngine()
    engine.warm_cache(digits_target)
    engine.forget_cache(digits_target.name)
    later = dataclasses.replace(digits_target, model=_damaged(digits_target.model, 0.4), version="v7")
    metrics = engine.apply(later, Forget(sample_ids=random_ids(len(digits_target.data.train), 40, seed=5))).metrics
    assert metrics["retain_acc_floor"] == pytest.approx(metrics["retain_acc_before"] - 0.02)
    engine.wait_for_refresh()


@pytest.mark.parametrize("cached_gradient", [True, False])
def test_a_baseline_that_could_not_be_computed_leaves_no_budget_and_no_request_waiting(digits_target,
                                                                                        cached_gradient):
    broken = dataclasses.replace(digits_target, spec={**digits_target.spec, "arch": "no-such-arch"})
    engine = IAUEngine(cached_gradient=cached_gradient)
    engine.prepare(broken)  # the background job fails building its copy of the model
    read: list[float | None] = []
    reader = threading.Thread(target=lambda: read.append(
        engine._baseline_accuracy(digits_target, digits_target.data.train.subset(torch.arange(50)))))
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive() and read == [None]
