import dataclasses

import pytest
import torch

from adapters.base import Forget, InvalidForget, NothingToForget, engine_class
from adapters.classifier import measures
from adapters.classifier.criteria import Scores
from adapters.classifier.salun import SalUnEngine, saliency_mask


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registered_under_its_method_name():
    assert engine_class("salun") is SalUnEngine


def test_class_forgetting_drives_forget_accuracy_near_zero_and_keeps_other_classes(digits_target):
    change = SalUnEngine().apply(digits_target, Forget(class_label=3))
    model = change.module(digits_target.spec)
    test = digits_target.data.test
    assert change.metrics["forget_acc_before"] > 0.9
    assert change.metrics["forget_acc_after"] <= 0.05
    others = test.subset(test.y != 3)
    assert measures.accuracy(model, others) >= measures.accuracy(digits_target.model, others) - 0.05


def test_random_forgetting_lowers_forget_accuracy_toward_held_out(digits_target, random_ids):
    ids = random_ids(len(digits_target.data.train), 140)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    change = SalUnEngine().apply(digits_target, Forget(sample_ids=ids))
    model = change.module(digits_target.spec)
    assert Scores.on(model, forget_rows).loss > Scores.on(digits_target.model, forget_rows).loss
    assert change.metrics["retain_acc_after"] >= change.metrics["retain_acc_before"] - 0.05
    assert set(change.forgotten_ids) == set(ids)


def test_random_forgetting_stops_once_the_rows_are_as_unsure_as_held_out_rows(digits_target, random_ids):
    # the default criterion: the forget rows' mean true-label probability down to the held-out rows' (the test
    # probe is all of the fixture's test rows), judged after every epoch and kept through the repair passes
    ids = random_ids(len(digits_target.data.train), 140, seed=3)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    held_out = Scores.on(digits_target.model, digits_target.data.test).confidence
    assert Scores.on(digits_target.model, forget_rows).confidence > held_out  # the step has work to do
    change = SalUnEngine().apply(digits_target, Forget(sample_ids=ids))
    assert Scores.on(change.module(digits_target.spec), forget_rows).confidence <= held_out
    assert change.metrics["epochs_run"] < SalUnEngine.Config().epochs  # it stopped early, on the criterion


def test_unknown_criterion_is_a_clear_error():
    with pytest.raises(ValueError, match="criterion"):
        SalUnEngine(criterion="vibes")


def test_does_not_mutate_the_target_model(digits_target):
    before = _state(digits_target.model)
    SalUnEngine().apply(digits_target, Forget(class_label=1))
    after = digits_target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_masked_weights_change(digits_target):
    forget_rows, _ = digits_target.resolve(Forget(class_label=5))
    mask = saliency_mask(digits_target.model, forget_rows, 0.5)
    kept = sum(m.sum() for m in mask) / sum(m.numel() for m in mask)
    assert 0.45 <= float(kept) <= 0.55
    change = SalUnEngine(mask_ratio=0.5).apply(digits_target, Forget(class_label=5))
    new = dict(zip([k for k, _ in digits_target.model.named_parameters()], [None] * len(mask), strict=True))
    for (name, p0), m in zip(digits_target.model.named_parameters(), mask, strict=True):
        moved = change.state[name] != p0.detach()
        assert not moved[m == 0].any(), f"{name}: a weight outside the saliency mask changed"
    assert new  # the model has parameters at all


def test_unknown_ids_are_rejected(digits_target):
    with pytest.raises(InvalidForget):
        SalUnEngine().apply(digits_target, Forget(sample_ids=(0, 10**6)))


def test_already_forgotten_ids_are_skipped(digits_target):
    target = dataclasses.replace(digits_target, forgotten=frozenset({0, 1, 2}))
    change = SalUnEngine(epochs=1).apply(target, Forget(sample_ids=(0, 1, 2, 3, 4)))
    assert set(change.forgotten_ids) == {3, 4}
    assert change.metrics["already_forgotten"] == 3
    with pytest.raises(NothingToForget) as nothing:
        SalUnEngine().apply(target, Forget(sample_ids=(0, 1)))
    assert nothing.value.already_forgotten == 2


def test_class_erasure_on_a_cnn_is_repaired_past_the_first_dip(digits_split):
    # one random-label pass costs a small CNN's other classes many points; the retain passes after it win them
    # back, though the first often dips, so the repair keeps going and ends on its best pass
    from adapters.classifier import model as classifier
    from adapters.classifier.model import ClassifierTarget

    spec = {"arch": "cnn", "input_shape": list(digits_split.input_shape), "num_classes": 10, "init_seed": 0}
    model = classifier.train_gr(classifier.build(spec), digits_split.train, epochs=20, alpha=0.0, seed=0)
    target = ClassifierTarget("digits-cnn", "v0", spec, model, digits_split)
    unrepaired = SalUnEngine(SalUnEngine.Config(repair_passes=0)).apply(target, Forget(class_label=1))
    repaired = SalUnEngine().apply(target, Forget(class_label=1))
    assert repaired.metrics["forget_acc_after"] <= 0.02
    assert 1 <= repaired.metrics["repair_passes"] <= SalUnEngine.Config().repair_passes
    assert repaired.metrics["retain_acc_after"] >= unrepaired.metrics["retain_acc_after"] + 0.05
    assert repaired.metrics["retain_acc_after"] >= repaired.metrics["retain_acc_before"] - 0.03
