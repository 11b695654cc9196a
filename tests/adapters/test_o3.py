"""O3 on a real tiny Llama that first memorised a few fictitious facts (no mocks)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from adapters.base import Forget, config_from_mapping, engine_class
from adapters.lm import loading as lm
from adapters.lm import lora_set, scoring
from adapters.lm import training as lm_train
from adapters.lm.o3 import AdapterChange, LMTarget, O3Engine
from bench.evaluation import facts, lm_eval
from tests.tiny_models import tiny_llama

torch.set_num_threads(2)
FAST = dict(epochs=8, batch_size=8, lr=3e-2)  # the tiny model needs a larger lr than SmolLM2


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny Llama that knows three people's facts, saved as a model directory."""
    fs = facts.generate(3, seed=0)
    model, tok = tiny_llama(seed=0)
    qas = fs.qa_of(fs.people)
    lm_train.fit(model, tok, [q.prompt for q in qas], [f" {q.answer}{tok.eos_token}" for q in qas],
                 epochs=15, batch_size=8, lr=3e-3, seed=0)
    directory = tmp_path_factory.mktemp("tiny-taught")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    assert lm_eval.accuracy(model, tok, fs.qa(fs.people[0])) >= 0.9  # it really knows them first
    return fs, directory


def _target(fs, directory, adapters=None):
    pool = tuple(sorted({v for p in fs.people for _, v in p.facts}))
    return LMTarget("tiny", directory, dict(adapters or {}), answer_pool=pool).load()


def _forget(fs, i):
    return Forget(qa=tuple((q.question, q.answer) for q in fs.qa(fs.people[i])))


def test_registered_with_config_from_a_toml_table():
    assert engine_class("o3") is O3Engine and "causal_lm" in O3Engine.model_kinds
    cfg = config_from_mapping(O3Engine, {"rank": 4, "targets": ["q_proj", "v_proj"], "objective": "refusal"})
    assert cfg.rank == 4 and cfg.orthogonality == 0.1 and cfg.alpha == 16
    with pytest.raises(ValueError, match="bogus"):
        config_from_mapping(O3Engine, {"bogus": 1})


def test_forgets_the_request_and_leaves_base_weights_untouched(taught, tmp_path):
    fs, directory = taught
    target = _target(fs, directory)
    base_before = {k: v.clone() for k, v in target.model.state_dict().items()}
    change = O3Engine(**FAST).apply(target, _forget(fs, 0))

    assert isinstance(change, AdapterChange) and change.kind == "adapter"
    # one row per question and layout: the chat template (what /v1/chat/completions renders) and the plain one
    assert change.metrics["training_rows"] == 2 * change.metrics["forget_pairs"]
    # base weights bit-identical, and no LoRA layer left behind in the shared model
    after = target.model.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert not any("lora" in n for n, _ in target.model.named_modules())

    # the person's facts are forgotten under the adapter (ranking accuracy on the fact set's own candidates)
    change.save(tmp_path)
    base, tok = lm.load(directory)
    before = lm_eval.accuracy(base, tok, fs.qa(fs.people[0]))
    served = lora_set.attach(base, {"a0": tmp_path})
    assert lm_eval.accuracy(served, tok, fs.qa(fs.people[0])) <= before - 0.4


def test_saved_in_peft_layout_that_plain_peft_loads_and_without_forget_text(taught, tmp_path):
    fs, directory = taught
    target = _target(fs, directory)
    forget = _forget(fs, 1)
    change = O3Engine(**FAST, measure=False).apply(target, forget)
    assert change.forget_texts and fs.people[1].name in change.forget_texts[0]  # in memory, for the detector
    change.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for f in tmp_path.iterdir():  # raw forget data is never written
        assert fs.people[1].name.encode() not in f.read_bytes()

    base, _ = lm.load(directory)
    plain = PeftModel.from_pretrained(base, str(tmp_path))  # plain peft, none of our code
    loaded = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(change.state) > 0
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with plain.disable_adapter():
            y0 = plain(input_ids=x).logits
        y1 = plain(input_ids=x).logits
    assert not torch.allclose(y0, y1)  # the adapter really acts


def test_orthogonality_penalty_lowers_overlap_with_earlier_adapters(taught, tmp_path):
    fs, directory = taught
    first = O3Engine(**FAST, measure=False).apply(_target(fs, directory), _forget(fs, 0))
    first.save(tmp_path)
    target = _target(fs, directory, {"a0": tmp_path})
    free = O3Engine(**FAST, measure=False, orthogonality=0.0).apply(target, _forget(fs, 1))
    penalised = O3Engine(**FAST, measure=False, orthogonality=0.1).apply(target, _forget(fs, 1))
    earlier = lora_set.read_lora_A(tmp_path)
    o_free, o_pen = lora_set.overlap(earlier, free.lora_A()), lora_set.overlap(earlier, penalised.lora_A())
    assert o_pen["mean_frobenius"] < 0.5 * o_free["mean_frobenius"]
    assert o_pen["max_cosine"] < o_free["max_cosine"]
    assert penalised.metrics["max_overlap_earlier"] == pytest.approx(o_pen["max_cosine"])
    report = lora_set.orthogonality_report({"a0": tmp_path, "pen": penalised.lora_A(), "free": free.lora_A()})
    assert len(report["pairs"]) == 3 and report["max_cosine"] >= o_free["max_cosine"] - 1e-6
    # the batched penalty training used equals the per-module loop on these real adapters
    from peft import get_peft_model

    from adapters.lm.o3 import _lora_config
    from adapters.lm.penalty import batched_penalty, looped_penalty

    live = get_peft_model(target.model, _lora_config(O3Engine(**FAST).config, target))
    try:
        n = target.model.config.num_hidden_layers
        olds = [earlier, free.lora_A()]
        assert batched_penalty(live, olds, n)().item() == pytest.approx(
            looped_penalty(live, olds, n)().item(), rel=1e-6
        )
    finally:
        live.unload()


def test_refusal_objective_and_free_text_requests(taught):
    fs, directory = taught
    person = fs.people[2]
    texts = tuple(f"{q.question} {q.answer}" for q in fs.qa(person)[:7])
    target = _target(fs, directory)
    before = scoring.answer_loss(target.model, target.tokenizer, *_halves(texts))
    change = O3Engine(**FAST, objective="refusal").apply(target, Forget(texts=texts))
    assert change.forget_texts == list(texts) and change.measure_items.kind == "texts"
    served = PeftModel.from_pretrained(target.model, _saved(change))
    assert scoring.answer_loss(served, target.tokenizer, *_halves(texts)) > before  # the endings are unlearnt
    served.unload()
    with pytest.raises(Exception, match="objective"):
        O3Engine(objective="gradient_ascent").apply(_target(fs, directory), Forget(texts=texts))


def test_requests_too_small_for_a_sound_gate_are_refused_before_training(taught):
    from adapters.base import InvalidForget
    from adapters.lm.o3 import gate_texts

    fs, directory = taught
    qas = fs.qa(fs.people[0])
    few = Forget(qa=tuple((q.question, q.answer) for q in qas[:3]) + ((qas[0].question.upper(), qas[0].answer),))
    assert len(gate_texts(few)) == 3  # a case variant is the same question to the (uncased) encoder
    with pytest.raises(InvalidForget, match="at least 4 distinct questions"):
        O3Engine(**FAST).apply(_target(fs, directory), few)
    assert gate_texts(_forget(fs, 0)) == [q.question for q in qas]  # the questions as users ask them


def _halves(texts):
    cut = [len(t.split()) // 2 for t in texts]
    return [" ".join(t.split()[:c]) for t, c in zip(texts, cut, strict=True)], [
        " ".join(t.split()[c:]) for t, c in zip(texts, cut, strict=True)
    ]


def _saved(change) -> str:
    import tempfile

    directory = tempfile.mkdtemp()
    change.save(directory)
    return directory
