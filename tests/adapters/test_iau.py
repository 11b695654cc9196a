import dataclasses

import pytest
import torch

from adapters import measures
from adapters.base import Forget, InvalidForget, engine_class
from adapters.iau import IAUEngine


def test_registered_under_its_method_name():
    assert engine_class("iau") is IAUEngine


def test_random_forgetting_raises_forget_loss_and_keeps_retain(digits_target, random_ids):
    ids = random_ids(len(digits_target.data.train), 140)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    change = IAUEngine().apply(digits_target, Forget(sample_ids=ids))
    model = change.module(digits_target.spec)
    assert measures.mean_loss(model, forget_rows) > measures.mean_loss(digits_target.model, forget_rows)
    assert change.metrics["retain_acc_after"] >= change.metrics["retain_acc_before"] - 0.03
    assert change.metrics["step_lr"] > 0


def test_class_forgetting_with_accuracy_criterion_reaches_low_forget_accuracy(digits_target):
    acc = IAUEngine().apply(digits_target, Forget(class_label=3)).metrics
    loss = IAUEngine(criterion="loss").apply(digits_target, Forget(class_label=3)).metrics
    assert acc["forget_acc_after"] < acc["forget_acc_before"] - 0.3
    # the accuracy criterion forgets a class at least as far as the loss criterion (it never stops earlier)
    assert acc["forget_acc_after"] <= loss["forget_acc_after"]


def test_does_not_mutate_the_target_model(digits_target):
    before = {k: v.clone() for k, v in digits_target.model.state_dict().items()}
    IAUEngine(cached_gradient=True).apply(digits_target, Forget(sample_ids=(5, 6, 7)))
    assert all(torch.equal(before[k], v) for k, v in digits_target.model.state_dict().items())


def test_unknown_ids_are_rejected(digits_target):
    with pytest.raises(InvalidForget):
        IAUEngine().apply(digits_target, Forget(sample_ids=(-1,)))


def test_already_forgotten_ids_are_skipped(digits_target):
    target = dataclasses.replace(digits_target, forgotten=frozenset({0, 1}))
    change = IAUEngine().apply(target, Forget(sample_ids=(0, 1, 2)))
    assert change.forgotten_ids == (2,)
    assert change.metrics["already_forgotten"] == 2


def test_cached_gradient_close_to_uncached(digits_target, random_ids):
    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 70, seed=4))
    plain = IAUEngine().apply(digits_target, forget)
    cached = IAUEngine(cached_gradient=True).apply(digits_target, forget)
    for key in ("forget_acc_after", "retain_acc_after", "test_acc_after"):
        assert abs(plain.metrics[key] - cached.metrics[key]) <= 0.02, key


def test_unknown_criterion_is_a_clear_error(digits_target):
    with pytest.raises(ValueError, match="criterion"):
        IAUEngine(criterion="vibes").apply(digits_target, Forget(sample_ids=(1,)))
