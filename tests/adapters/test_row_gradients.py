import dataclasses

import pytest
import torch
from torch import nn

from adapters.base import Forget
from adapters.classifier import model as classifier
from adapters.classifier import row_gradients
from adapters.classifier.iau import IAUEngine
from adapters.classifier.model import ClassifierTarget, mean_loss_grad

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(split, arch):
    return {"arch": arch, "input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "hidden": [32, 16], "init_seed": 0}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request, digits_split):
    """(spec, a model of each architecture fitted to its rows: they look seen, so a request takes a step)."""
    spec = _spec(digits_split, request.param)
    return spec, classifier.train_gr(classifier.build(spec), digits_split.train, epochs=25, alpha=0.0, seed=0)


def test_any_subsets_mean_gradient_and_logits_are_those_of_a_pass_over_it(trained, digits_split):
    spec, model = trained
    rows = digits_split.train
    kept = row_gradients.compute(model, rows, batch_size=300)  # several batches, joined
    assert kept is not None
    assert 1 <= kept.nbytes / 2**20 / row_gradients.size_mb(model, len(rows)) <= 1.1  # the logits come on top
    subset = rows.subset(torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))[:97])
    for got, want in zip(kept.mean_grad(subset.ids), mean_loss_grad(model, subset), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(kept.total(), mean_loss_grad(model, rows), strict=True):
        torch.testing.assert_close(got / len(rows), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kept.logits_of(subset.ids), model(subset.x), rtol=1e-4, atol=1e-5)


def test_rows_outside_the_kept_ones_are_an_error(trained, digits_split):
    _, model = trained
    kept = row_gradients.compute(model, digits_split.train.subset(torch.arange(50)))
    with pytest.raises(KeyError):
        kept.mean_grad(digits_split.train.ids[45:55])


class _Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


class _SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.inner(self.inner(x.flatten(1))))


@pytest.mark.parametrize("module", [_Normalised, _SharedLayer])
def test_a_model_with_another_kind_of_layer_or_a_layer_used_twice_is_not_covered(module, digits_split):
    model = module()
    assert row_gradients.compute(model, digits_split.train.subset(torch.arange(20))) is None
    if module is _Normalised:
        assert not row_gradients.covers(model) and row_gradients.size_mb(model, 10) == float("inf")


@pytest.mark.parametrize("max_mb", [256.0, 0.0])
def test_iau_from_kept_row_gradients_takes_the_step_it_takes_without_any_cache(trained, digits_split, random_ids,
                                                                                max_mb):
    """A sequence of requests on the version the engine made: the forget gradient read off the kept rows (or, with
    none kept, computed) gives the same change as an engine that computes everything on the request path."""
    spec, model = trained
    target = ClassifierTarget("t", "v0", spec, model, digits_split)
    ids = random_ids(len(digits_split.train), 90, seed=11)
    # by accuracy: by the default criterion many of these rows already look unseen to the small model (no step)
    cached = IAUEngine(row_gradients_max_mb=max_mb, criterion="accuracy")
    cold = IAUEngine(cached_gradient=False, criterion="accuracy")
    steps = []
    cached.warm_cache(target)
    cold.warm_cache(target)  # the lineage's retain baseline (retain_budget.py), which the cached engine keeps too
    for step, chunk in enumerate((ids[:30], ids[30:60], ids[60:]), start=1):
        cache = cached._cached(target)
        assert cache is not None and (cache.rows is not None) == (max_mb > 0)
        with_cache = cached.apply(target, Forget(sample_ids=chunk))
        without = cold.apply(target, Forget(sample_ids=chunk))
        steps.append(with_cache.metrics["step_lr"])
        assert with_cache.metrics["gradient_cached"] == 1.0
        assert with_cache.metrics["step_lr"] == pytest.approx(without.metrics["step_lr"], rel=1e-6)
        for key in ("forget_acc_before", "retain_acc_before", "forget_acc_after", "retain_acc_after"):
            assert with_cache.metrics[key] == pytest.approx(without.metrics[key], abs=1e-6), key
        for name, tensor in with_cache.state.items():
            torch.testing.assert_close(tensor, without.state[name], rtol=1e-4, atol=1e-6)
        target = dataclasses.replace(target, model=with_cache.module(spec), version=f"v{step}",
                                     forgotten=target.forgotten | frozenset(with_cache.forgotten_ids))
    cached.wait_for_refresh()
    assert any(lr > 0 for lr in steps), steps  # a real step, not only rows that already looked unseen
