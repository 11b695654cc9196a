import math

import pytest
import torch

from adapters.base import Forget
from adapters.classifier.criteria import Scores, looks_unseen


def test_scores_are_accuracy_mean_true_label_probability_and_mean_cross_entropy():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))  # softmax gives back these rows
    scores = Scores.of(logits, torch.tensor([0, 1]))
    assert scores.accuracy == pytest.approx(0.5)  # the second row's argmax is class 0
    assert scores.confidence == pytest.approx((0.7 + 0.3) / 2)
    assert scores.loss == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)


def test_no_rows_score_nan_not_an_error():
    scores = Scores.of(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert all(math.isnan(v) for v in (scores.accuracy, scores.confidence, scores.loss))


HELD_OUT = Scores(accuracy=0.9, confidence=0.85, loss=0.4)
SAMPLES = Forget(sample_ids=(1, 2))


@pytest.mark.parametrize(("criterion", "unseen", "seen"), [
    ("confidence", Scores(1.0, 0.85, 0.1), Scores(0.5, 0.86, 9.0)),  # only the mean confidence counts
    ("accuracy", Scores(0.9, 0.99, 0.1), Scores(0.91, 0.1, 9.0)),
    ("loss", Scores(1.0, 0.99, 0.4), Scores(0.0, 0.1, 0.39)),
])
def test_sample_rows_look_unseen_once_they_score_no_better_than_held_out_rows(criterion, unseen, seen):
    test = looks_unseen(criterion, SAMPLES, HELD_OUT, class_forget_max=0.02)
    assert test(unseen) and not test(seen)


@pytest.mark.parametrize("criterion", ["confidence", "accuracy", "loss"])
def test_a_class_looks_unseen_once_the_model_stops_predicting_it_whatever_the_criterion(criterion):
    test = looks_unseen(criterion, Forget(class_label=3), HELD_OUT, class_forget_max=0.02)
    assert test(Scores(0.02, 0.9, 0.1))  # confident on the rows it still gets right: irrelevant for a class
    assert not test(Scores(0.03, 0.0, 9.0))


def test_an_unknown_criterion_is_a_clear_error():
    with pytest.raises(ValueError, match="criterion: one of confidence, accuracy, loss"):
        looks_unseen("vibes", SAMPLES, HELD_OUT, class_forget_max=0.0)  # type: ignore[arg-type]
