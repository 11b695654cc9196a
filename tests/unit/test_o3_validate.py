"""O3 refuses a request too small for a sound gate before anything is loaded or trained."""

from __future__ import annotations

import pytest

from adapters.base import Forget, InvalidForget
from adapters.lm.o3 import LMTarget, O3Engine, gate_texts
from detector.gate import MIN_GATE_TEXTS

TEXTS = [f"Fact number {i} about the person who asked to be forgotten" for i in range(MIN_GATE_TEXTS)]


@pytest.fixture
def target(tmp_path):
    return LMTarget("never-loaded", tmp_path / "no-model-here")  # loading it would fail: nothing may load it


@pytest.mark.parametrize("forget, noun", [
    (Forget(texts=tuple(TEXTS[:-1])), "texts"),
    (Forget(texts=tuple(TEXTS[:-1]) + (TEXTS[0].upper(), f"  {TEXTS[1]}  ")), "texts"),  # variants do not count
    (Forget(qa=tuple((f"{t}?", "an answer") for t in TEXTS[:-1])), "questions"),
])
def test_fewer_distinct_texts_than_a_gate_needs_are_refused_before_training(target, forget, noun):
    assert len(gate_texts(forget)) == MIN_GATE_TEXTS - 1
    message = f"at least {MIN_GATE_TEXTS} distinct {noun} \\(got {MIN_GATE_TEXTS - 1}\\)"
    with pytest.raises(InvalidForget, match=message):
        O3Engine().validate(target, forget)
    with pytest.raises(InvalidForget, match=message):
        O3Engine().apply(target, forget)  # apply validates first: the missing model is never loaded
    assert target.model is None


def test_enough_distinct_texts_pass_validation(target):
    O3Engine().validate(target, Forget(texts=tuple(TEXTS)))
    O3Engine().validate(target, Forget(qa=tuple((f"{t}?", "an answer") for t in TEXTS)))
    assert target.model is None


def test_what_o3_cannot_train_on_is_refused_too(target):
    with pytest.raises(InvalidForget, match="forget.qa or forget.texts"):
        O3Engine().validate(target, Forget(texts=("one", "two", "three", "four")))  # no word to continue



def test_an_unknown_objective_is_refused_when_the_engine_is_built_not_per_request():
    with pytest.raises(ValueError, match="objective: must be one of \\['random_label', 'refusal'\\]"):
        O3Engine(objective="gradient_ascent")
