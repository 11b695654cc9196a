import dataclasses

import pytest
import torch

from adapters.base import Forget, InvalidForget, engine_class, engine_names
from adapters.classifier.salun import SalUnEngine
from adapters.diffusion.salun import DiffusionSalUnEngine, saliency_mask

from .conftest import FAST, TINY, state


def _engine(**overrides):
    return DiffusionSalUnEngine(**{**FAST, **overrides})


def test_one_method_name_per_model_kind():
    assert engine_class("salun", "diffusion") is DiffusionSalUnEngine
    assert engine_class("salun", "classifier") is SalUnEngine
    assert engine_class("salun") is SalUnEngine  # kind-less callers keep the classifier engine
    assert "salun" in engine_names("diffusion") and "iau" not in engine_names("diffusion")
    with pytest.raises(KeyError, match="does not apply to causal_lm models"):
        engine_class("salun", "causal_lm")


def test_mask_covers_half_of_the_weights_by_saliency(tiny_target):
    forget_class, rows, _ = tiny_target.split(Forget(class_label=3))
    mask = saliency_mask(tiny_target.model, TINY, tiny_target.train_images[rows], forget_class, 0.5)
    share = float(sum(m.sum() for m in mask) / sum(m.numel() for m in mask))
    assert 0.45 <= share <= 0.55
    embeddings = dict(zip([n for n, _ in tiny_target.model.named_parameters()], mask, strict=True))[
        "class_embedding.weight"
    ]
    assert not embeddings[[c for c in range(11) if c != 3]].any()  # other classes' rows get no gradient at all


def test_only_masked_weights_move_and_the_rest_stay_bit_identical(tiny_target):
    forget_class, rows, _ = tiny_target.split(Forget(class_label=3))
    mask = saliency_mask(tiny_target.model, TINY, tiny_target.train_images[rows], forget_class, 0.5)
    change = _engine().apply(tiny_target, Forget(class_label=3))
    moved = 0
    for (name, p0), m in zip(tiny_target.model.named_parameters(), mask, strict=True):
        new = change.state[name]
        assert torch.equal(new[~m], p0.detach()[~m]), f"{name}: a weight outside the saliency mask changed"
        moved += int((new[m] != p0.detach()[m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask)


def test_forget_loss_decreases_and_the_target_is_not_mutated(tiny_target):
    before = state(tiny_target.model)
    # alpha = 0: the forgetting term alone (the tiny model's retain loss is large enough to mask the trend)
    change = _engine(steps=30, alpha=0.0).apply(tiny_target, Forget(class_label=5))
    assert change.metrics["forget_loss_after"] < 0.5 * change.metrics["forget_loss_before"]
    assert all(torch.equal(before[k], v) for k, v in tiny_target.model.state_dict().items())
    assert change.metrics["redirect_class"] == 6 and change.metrics["forget_class"] == 5
    assert set(change.forgotten_ids) == set(tiny_target.data.train.ids[tiny_target.data.train.y == 5].tolist())
    for key in ("UA_before", "UA_after", "retain_acc_before", "retain_acc_after"):
        assert 0.0 <= change.metrics[key] <= 1.0


def test_sequential_requests_build_on_each_other(tiny_target):
    engine, target = _engine(), tiny_target
    for version, c in enumerate((3, 7, 1), start=2):
        change = engine.apply(target, Forget(class_label=c))
        assert change.metrics["forget_class"] == c
        target = target.advanced(change, f"v{version}")
    assert target.forgotten_classes == {3, 7, 1}
    # the second request's "before" is what the first measured after: nothing re-sampled, nothing lost
    assert target.recognition is not None and len(target.recognition.rates) == 10
    _, _, remaining = target.split(Forget(class_label=0))
    assert not torch.isin(target.data.train.y[remaining], torch.tensor([0, 1, 3, 7])).any()
    assert target.redirect_class(0) == 2  # 1 is forgotten: the redirect skips it
    with pytest.raises(InvalidForget, match="class 7 is already forgotten"):
        engine.apply(target, Forget(class_label=7))


def test_before_figures_come_from_the_version_that_measured_them(tiny_target):
    engine = _engine()
    first = engine.apply(tiny_target, Forget(class_label=2))
    target = tiny_target.advanced(first, "v2")
    second = engine.apply(target, Forget(class_label=4))
    rates = first.info["recognition"]["rates"]
    assert second.metrics["forget_acc_before"] == rates[4]
    assert second.metrics["earlier_forgotten_UA_min_before"] == 1.0 - rates[2]
    assert target.model is first.module(TINY)


@pytest.mark.parametrize("forget, reason", [
    (Forget(sample_ids=(1, 2)), "forget.sample_ids"),
    (Forget(texts=("a text",)), "forget.texts applies to language models"),
    (Forget(qa=(("q", "a"),)), "forget.qa applies to language models"),
    (Forget(image="x.png", mask="m.png"), "Attentive Eraser"),
    (Forget(concept="cats"), "not on text concepts"),
    (Forget(), "names nothing"),
    (Forget(class_label=10), "class 10 outside 0..9"),
    (Forget(class_label=-1), "outside 0..9"),
])
def test_requests_this_kind_cannot_serve_say_why(tiny_target, forget, reason):
    engine = _engine()
    with pytest.raises(InvalidForget, match=reason):
        engine.validate(tiny_target, forget)
    with pytest.raises(InvalidForget, match=reason):
        engine.apply(tiny_target, forget)


def test_forgetting_every_class_is_refused(tiny_target):
    everything_but_0 = tiny_target.data.train.ids[tiny_target.data.train.y != 0].tolist()
    target = dataclasses.replace(tiny_target, forgotten=frozenset(everything_but_0))
    with pytest.raises(InvalidForget, match="every class"):
        _engine().validate(target, Forget(class_label=0))


def test_config_rejects_an_unknown_redirect_source():
    with pytest.raises(ValueError, match="redirect_to"):
        DiffusionSalUnEngine(redirect_to="nowhere")


def test_a_later_request_holds_the_classes_forgotten_before_it(tiny_target):
    first = _engine().apply(tiny_target, Forget(class_label=3))
    target = tiny_target.advanced(first, "v2")
    assert first.metrics["held_classes"] == 0 and first.metrics["held_drift_after"] == 0.0
    # a high lr moves the shared weights a lot, so the hold term's effect is plain
    free = _engine(steps=30, lr=3e-3, hold_share=0.0).apply(target, Forget(class_label=7))
    held = _engine(steps=30, lr=3e-3).apply(target, Forget(class_label=7))  # the default hold
    assert held.metrics["held_classes"] == 1 == free.metrics["held_classes"]
    assert held.metrics["held_drift_after"] < 0.5 * free.metrics["held_drift_after"]
    assert held.metrics["forget_class"] == 7 and set(held.forgotten_ids) == set(free.forgotten_ids)
