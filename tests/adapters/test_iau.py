import copy
import dataclasses

import pytest
import torch

from adapters.base import Forget, InvalidForget, engine_class
from adapters.classifier import measures
from adapters.classifier.iau import IAUEngine


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
    engine = IAUEngine()
    engine.apply(digits_target, Forget(sample_ids=(5, 6, 7)))
    engine.wait_for_refresh()
    assert all(torch.equal(before[k], v) for k, v in digits_target.model.state_dict().items())


def test_unknown_ids_are_rejected(digits_target):
    with pytest.raises(InvalidForget):
        IAUEngine().apply(digits_target, Forget(sample_ids=(-1,)))


def test_already_forgotten_ids_are_skipped(digits_target):
    target = dataclasses.replace(digits_target, forgotten=frozenset({0, 1}))
    change = IAUEngine().apply(target, Forget(sample_ids=(0, 1, 2)))
    assert change.forgotten_ids == (2,)
    assert change.metrics["already_forgotten"] == 2


def _next(target, change, step):
    return dataclasses.replace(target, model=change.module(target.spec), version=f"v{step}",
                               forgotten=target.forgotten | frozenset(change.forgotten_ids))


def test_cached_gradient_is_exact_along_a_sequence(digits_target, random_ids):
    """The cache is refreshed for each new version off the request path, so every request of a sequence takes
    the same step as an engine that computes the remaining-set gradient itself."""
    ids = random_ids(len(digits_target.data.train), 60, seed=4)
    cached, cold = IAUEngine(), IAUEngine(cached_gradient=False)
    cached.warm_cache(digits_target)
    target = digits_target
    for step, chunk in enumerate((ids[:20], ids[20:40], ids[40:]), start=1):
        with_cache = cached.apply(target, Forget(sample_ids=chunk))
        without = cold.apply(target, Forget(sample_ids=chunk))
        assert with_cache.metrics["gradient_cached"] == 1.0 and without.metrics["gradient_cached"] == 0.0
        assert with_cache.metrics["step_lr"] == pytest.approx(without.metrics["step_lr"], rel=1e-6)
        for name, tensor in with_cache.state.items():
            torch.testing.assert_close(tensor, without.state[name], rtol=1e-4, atol=1e-6)
        target = _next(target, with_cache, step)


def test_cache_is_used_only_for_the_exact_version(digits_target):
    engine = IAUEngine()
    change = engine.apply(digits_target, Forget(sample_ids=(1, 2, 3)))
    engine.wait_for_refresh()
    # A restart or a rollback loads the version into a new module: a miss, computed on the request path.
    reloaded = dataclasses.replace(_next(digits_target, change, 1),
                                   model=copy.deepcopy(change.module(digits_target.spec)))
    assert engine.apply(reloaded, Forget(sample_ids=(4,))).metrics["gradient_cached"] == 0.0
    assert engine.apply(_next(digits_target, change, 1), Forget(sample_ids=(4,))).metrics["gradient_cached"] == 1.0
    # The same weights with another forgotten set (another lineage) is a miss too.
    other = dataclasses.replace(_next(digits_target, change, 1), forgotten=frozenset({1, 2}))
    assert engine.apply(other, Forget(sample_ids=(4,))).metrics["gradient_cached"] == 0.0


def test_calibration_searches_below_the_codes_lr_and_stays_in_range(digits_target, random_ids):
    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 70, seed=5))
    narrow = IAUEngine(lr_min=1e-6, lr_max=1e-4).apply(digits_target, forget).metrics
    assert 1e-6 <= narrow["step_lr"] <= 1e-4  # every step tried is in range, including ones below 1e-3
    assert IAUEngine(calibrate=False, lr=7e-4).apply(digits_target, forget).metrics["step_lr"] == 7e-4


def test_unknown_criterion_is_a_clear_error(digits_target):
    with pytest.raises(ValueError, match="criterion"):
        IAUEngine(criterion="vibes").apply(digits_target, Forget(sample_ids=(1,)))


def test_each_trial_step_is_measured_once_and_the_result_reuses_it(digits_target, random_ids):
    """The calibration's trials are forward passes; the step finally taken is one of them, so the engine does not
    measure it again, and the forget accuracy it reports is that trial's when the probe holds every forget row."""
    ids = random_ids(len(digits_target.data.train), 60)
    engine = IAUEngine(cached_gradient=False)
    passes = []
    original_copy = digits_target.copy_model

    def counted_copy():
        model = original_copy()
        model.register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
        return model

    target = dataclasses.replace(digits_target)
    object.__setattr__(target, "copy_model", counted_copy)
    change = engine.apply(target, Forget(sample_ids=ids))
    trial_rows = 60 + min(engine.config.measure_cap, len(digits_target.data.train) - 60)
    trials = [n for n in passes if n == trial_rows]
    assert len(trials) == engine.config.calibration_steps  # no trial repeated for the chosen step
    model = change.module(digits_target.spec)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    assert change.metrics["forget_acc_after"] == pytest.approx(measures.accuracy(model, forget_rows))


def test_copy_model_is_an_independent_module_with_the_same_weights(digits_target):
    copy_ = digits_target.copy_model()
    assert copy_ is not digits_target.model and not copy_.training
    for (name, a), (_, b) in zip(copy_.state_dict().items(), digits_target.model.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert all(p.requires_grad for p in copy_.parameters())
    x = digits_target.data.test.x[:8]
    torch.testing.assert_close(copy_(x), digits_target.model.eval()(x))
