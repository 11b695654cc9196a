import pytest
import torch

from adapters.classifier import measures as classifier_measures
from adapters.diffusion import judge, measures

from .conftest import TINY


def test_forgetting_measures_separate_the_forgotten_retained_and_earlier_classes():
    rates = [0.9, 0.8, 0.05, 1.0, 0.7, 0.6, 0.5, 0.02, 0.4, 0.3]
    m = measures.forgetting_measures(rates, forget_class=2, forgotten_before={7})
    assert m["forget_acc"] == 0.05 and m["UA"] == pytest.approx(0.95)
    assert m["retain_acc"] == pytest.approx(sum(rates[c] for c in (0, 1, 3, 4, 5, 6, 8, 9)) / 8)
    assert m["earlier_forgotten_UA_min"] == pytest.approx(0.98)
    assert "earlier_forgotten_UA_min" not in measures.forgetting_measures(rates, 2, ())  # no NaN in result events


def test_recognition_rates_are_the_judges_per_class_accuracy(tiny_data, tiny_judge):
    real = judge.as_judge_input(tiny_data.test, TINY)
    rates = measures.recognition_rates(tiny_judge, real.x, real.y, range(10))
    for c, rate in enumerate(rates):
        assert rate == pytest.approx(classifier_measures.accuracy(tiny_judge, real.subset(real.y == c)))


def test_recognition_samples_every_class_and_round_trips(tiny_model, tiny_judge):
    settings = measures.SampleSettings(per_class=2, steps=2, guidance=2.0, seed=3)
    rec = measures.recognition(tiny_model, TINY, tiny_judge, settings)
    assert len(rec.rates) == 10 and all(r in (0.0, 0.5, 1.0) for r in rec.rates)
    assert measures.Recognition.from_dict(rec.to_dict()) == rec
    assert measures.recognition(tiny_model, TINY, tiny_judge, settings) == rec  # same seed, same samples
    assert measures.Recognition.from_dict(None) is None


def test_samples_come_in_class_order(tiny_model):
    images, labels = measures.generate(tiny_model, TINY, [4, 1], measures.SampleSettings(per_class=3, steps=2))
    assert labels.tolist() == [4, 4, 4, 1, 1, 1] and images.shape == (6, 1, 8, 8)
    assert torch.isfinite(images).all()
