import copy
import dataclasses
import math

import pytest
import torch

from adapters.base import Forget, InvalidForget, engine_class
from adapters.classifier import measures, step_search
from adapters.classifier.criteria import Scores
from adapters.classifier.iau import GUARD_PRECISION, IAUConfig, IAUEngine
from adapters.classifier.trial_step import TrialStep


def test_registered_under_its_method_name():
    assert engine_class("iau") is IAUEngine


def test_random_forgetting_raises_forget_loss_and_keeps_retain(digits_target, random_ids):
    ids = random_ids(len(digits_target.data.train), 140)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    # by accuracy: by the default criterion these rows of the small fixture model already look unseen (below)
    change = IAUEngine(criterion="accuracy").apply(digits_target, Forget(sample_ids=ids))
    model = change.module(digits_target.spec)
    assert Scores.on(model, forget_rows).loss > Scores.on(digits_target.model, forget_rows).loss
    assert change.metrics["retain_acc_after"] >= change.metrics["retain_acc_before"] - 0.03
    assert change.metrics["step_lr"] > 0
    assert change.metrics["criterion_met"] == 1.0


def test_a_class_is_forgotten_by_its_own_rule_whatever_the_criterion(digits_target):
    # a class is erased once the model stops predicting it: the loss criterion (which stops class forgetting early)
    # does not apply to it, so both settings take the same step
    default = IAUEngine(cached_gradient=False).apply(digits_target, Forget(class_label=3)).metrics
    by_loss = IAUEngine(cached_gradient=False, criterion="loss").apply(digits_target, Forget(class_label=3)).metrics
    assert default["forget_acc_after"] < default["forget_acc_before"] - 0.3
    assert by_loss["step_lr"] == default["step_lr"] > 0
    assert by_loss["forget_acc_after"] == default["forget_acc_after"]


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
    measure it again, and the forget accuracy it reports is that trial's when the probe holds every forget row.
    The retain probe is read once, at the step the bisection found, when that step is within the guard."""
    ids = random_ids(len(digits_target.data.train), 60)
    engine = IAUEngine(cached_gradient=False, criterion="accuracy")  # rows these need a step for (see below)
    passes = []
    original_copy = digits_target.copy_model

    def counted_copy():
        model = original_copy()
        last = list(model.modules())[-1]  # the output layer: trials may skip the first (see TrialStep)
        last.register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
        return model

    target = dataclasses.replace(digits_target)
    object.__setattr__(target, "copy_model", counted_copy)
    change = engine.apply(target, Forget(sample_ids=ids))
    steps, probe = engine.config.calibration_steps, engine.config.measure_cap
    assert passes.count(60) == steps + 1  # the gradient's forward, then one per trial: none repeated for the result
    # probe-sized passes: retain before, test after, the guard at the step the search found, and only where that
    # step costs too much, a search below it for the guard's edge (at most twice a bisection's trials)
    guard_passes = passes.count(probe) - 2
    drop = change.metrics["retain_acc_before"] - change.metrics["retain_acc_after"]
    edge_bisection = math.ceil(math.log2(math.log(engine.config.lr_max / engine.config.lr_min)
                                         / math.log(GUARD_PRECISION)))
    assert guard_passes == 1 or (drop <= engine.config.max_retain_drop
                                 and 1 < guard_passes <= 1 + 2 * edge_bisection)
    model = change.module(digits_target.spec)
    forget_rows, _ = digits_target.resolve(Forget(sample_ids=ids))
    assert change.metrics["forget_acc_after"] == pytest.approx(measures.accuracy(model, forget_rows))


def test_a_step_range_that_never_forgets_enough_takes_its_largest_step_within_the_guard(digits_target, random_ids):
    # steps this small never bring the forget rows down to held-out accuracy: no trial reaches the criterion, so
    # the step taken is the largest trial (bisection went up every time) once the guard has been checked there
    ids = random_ids(len(digits_target.data.train), 60)
    cfg = IAUEngine.Config(lr_min=1e-8, lr_max=1e-7, calibration_steps=4, max_retain_drop=0.0, criterion="accuracy")
    change = IAUEngine(cfg, cached_gradient=False).apply(digits_target, Forget(sample_ids=ids))
    largest_trial = math.exp(math.log(cfg.lr_max) - (math.log(cfg.lr_max) - math.log(cfg.lr_min)) / 2 ** 4)
    assert change.metrics["step_lr"] == pytest.approx(largest_trial)
    assert change.metrics["retain_acc_after"] >= change.metrics["retain_acc_before"]
    assert change.metrics["forget_acc_after"] > change.metrics["test_acc_before"]
    assert change.metrics["criterion_met"] == 0.0  # a valid version, which says it stopped short


def test_copy_model_is_an_independent_module_with_the_same_weights(digits_target):
    copy_ = digits_target.copy_model()
    assert copy_ is not digits_target.model and not copy_.training
    for (name, a), (_, b) in zip(copy_.state_dict().items(), digits_target.model.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert all(p.requires_grad for p in copy_.parameters())
    x = digits_target.data.test.x[:8]
    torch.testing.assert_close(copy_(x), digits_target.model.eval()(x))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_trial_logits_through_the_linear_entry_match_a_whole_forward_pass(digits_split, arch):
    from adapters.classifier import model as classifier

    spec = {"arch": arch, "input_shape": list(digits_split.input_shape), "num_classes": 10, "init_seed": 0}
    model = classifier.build(spec)
    direction = [torch.randn_like(p) for p in model.parameters()]
    rows, probe = digits_split.train.sample(40, seed=1), digits_split.test.sample(30, seed=2)
    step = TrialStep(model, direction, rows, probe)
    assert not step._entry_terms  # computed when a trial first needs them (none, when no step is taken)
    for lr in (0.1, 0.0, 3e-3):  # the first trial away from theta0: the terms are of theta0's weights all the same
        step._set(lr)
        for which, part in (("forget", rows), ("retain", probe)):
            torch.testing.assert_close(step._logits(which, part), model(part.x), rtol=1e-4, atol=1e-5)
    assert set(step._entry_terms) == {"forget", "retain"}


def test_rows_that_already_look_unseen_get_no_step(digits_target, random_ids):
    # these 60 rows are, on average, less confidently right than held-out rows: by the default criterion a
    # retrain would not move them, so the version keeps its weights; by accuracy (coarser) they still need a step
    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 60))
    change = IAUEngine(cached_gradient=False).apply(digits_target, forget)
    assert (change.metrics["step_lr"], change.metrics["criterion_met"]) == (0.0, 1.0)
    for name, weights in digits_target.model.state_dict().items():
        assert torch.equal(change.state[name], weights), name
    assert set(change.forgotten_ids) == set(forget.sample_ids)
    by_accuracy = IAUEngine(cached_gradient=False, criterion="accuracy").apply(digits_target, forget)
    assert by_accuracy.metrics["step_lr"] > 0


def test_the_refresh_copy_serves_one_request_and_a_second_on_the_version_copies_again(digits_target, random_ids):
    engine = IAUEngine(criterion="accuracy")
    engine.warm_cache(digits_target)
    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 30, seed=7))
    first = engine.apply(digits_target, forget)  # takes the refresh's copy as its working module
    second = engine.apply(digits_target, forget)  # the same version again (e.g. a change that failed to commit)
    engine.wait_for_refresh()
    spec = digits_target.spec
    assert first.module(spec) is not second.module(spec) and first.module(spec) is not digits_target.model
    assert second.metrics["gradient_cached"] == 1.0
    for name, weights in first.state.items():
        assert torch.equal(weights, second.state[name]), name
    assert first.metrics["step_lr"] > 0


def test_when_the_criterion_costs_too_much_the_step_is_the_largest_within_the_guard(digits_target, random_ids):
    # by accuracy these rows need a step that costs more retain accuracy than a guard this tight allows: the step
    # taken is within the guard, and one GUARD_PRECISION times larger (the same direction, uncalibrated) is not
    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 200, seed=2))
    settings = {"cached_gradient": False, "criterion": "accuracy", "max_retain_drop": 0.0}
    taken = IAUEngine(**settings).apply(digits_target, forget).metrics
    assert taken["forget_acc_after"] > taken["test_acc_before"]  # the criterion was out of reach
    assert taken["step_lr"] > 0 and taken["retain_acc_after"] >= taken["retain_acc_floor"]
    larger = IAUEngine(**settings, calibrate=False, lr=taken["step_lr"] * GUARD_PRECISION).apply(digits_target, forget)
    assert larger.metrics["retain_acc_before"] == taken["retain_acc_before"]  # the same probe
    assert larger.metrics["retain_acc_after"] < taken["retain_acc_floor"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_the_forget_gradient_pass_hands_its_linear_entry_output_to_the_trials(digits_split, arch):
    # the gradient's forward pass computes the first trial term already: the trials reuse it, and the gradient,
    # the logits and every trial's logits are those of a model evaluated whole
    from adapters.classifier import model as classifier

    spec = {"arch": arch, "input_shape": list(digits_split.input_shape), "num_classes": 10, "init_seed": 0}
    model = classifier.build(spec).eval()
    rows, probe = digits_split.train.sample(40, seed=1), digits_split.test.sample(30, seed=2)
    grads, logits, entry_out = TrialStep.forget_gradient(model, rows)
    whole_grads, whole_logits = classifier.mean_loss_grad_and_logits(model, rows)
    torch.testing.assert_close(logits, whole_logits)
    for g, whole in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(g, whole)
    entry, _ = model.linear_entry()
    torch.testing.assert_close(entry_out, entry(rows.x))
    step = TrialStep(model, [torch.randn_like(p) for p in model.parameters()], rows, probe, forget_entry=entry_out)
    step._set(3e-3)
    torch.testing.assert_close(step._logits("forget", rows), model(rows.x), rtol=1e-4, atol=1e-5)
    assert step._entry_terms["forget"][0] is entry_out


def test_the_engine_steps_where_a_bisection_would_with_fewer_forward_passes(digits_target, random_ids, monkeypatch):
    """The default criterion (confidence) is smooth: the engine interpolates, and lands within the bisection's
    precision of the step the bisection takes."""

    forget = Forget(sample_ids=random_ids(len(digits_target.data.train), 90, seed=3))
    calls = {"n": 0}
    original = TrialStep.forget_scores

    def counted(self, lr):
        calls["n"] += (("forget", lr) not in self._measured)
        return original(self, lr)

    monkeypatch.setattr(TrialStep, "forget_scores", counted)
    interpolated = IAUEngine(cached_gradient=False).apply(digits_target, forget).metrics
    interpolated_trials, calls["n"] = calls["n"], 0
    monkeypatch.setattr(step_search, "interpolated", step_search.bisection)
    bisected = IAUEngine(cached_gradient=False).apply(digits_target, forget).metrics
    cfg = IAUConfig()
    precision = math.exp(math.log(cfg.lr_max / cfg.lr_min) / 2 ** cfg.calibration_steps)
    assert bisected["step_lr"] > 0 and bisected["criterion_met"] == interpolated["criterion_met"] == 1.0
    assert bisected["step_lr"] / precision <= interpolated["step_lr"] <= bisected["step_lr"] * precision
    assert interpolated_trials < calls["n"]
