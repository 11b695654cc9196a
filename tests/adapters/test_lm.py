"""Loading causal LMs offline: the tiny test model, any model directory, and SmolLM2 from its GGUF."""

from __future__ import annotations

import pytest
import torch

from adapters.lm import loading as lm
from adapters.lm import scoring
from bench.evaluation import facts, lm_eval
from tests.tiny_models import tiny_llama


def test_tiny_model_round_trips_through_a_safetensors_directory(tmp_path):
    model, tok = tiny_llama(tmp_path, seed=1)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded, tok2 = lm.load(tmp_path)
    x = torch.tensor([tok("Question: who?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-6)
    text = "Where was Liora Vantrel born?\n"
    assert tok2.decode(tok2(text)["input_ids"]) == text  # character level, lossless on ASCII


def test_encode_pairs_labels_only_the_target_tokens():
    _, tok = tiny_llama()
    ids, mask, labels = lm.encode_pairs(tok, ["Q: a\nA:", "Q: longer one\nA:"], [" x", " yz"])
    assert ids.shape == mask.shape == labels.shape
    assert (labels != lm.IGNORE).sum(1).tolist() == [2, 3]  # " x" and " yz", character tokens
    assert tok.decode(ids[1][labels[1] != lm.IGNORE]) == " yz"
    assert mask.sum(1).tolist() == [len("Q: a\nA:") + 2, len("Q: longer one\nA:") + 3]


def test_shared_prompt_scoring_equals_row_by_row_scoring():
    model, tok = tiny_llama(seed=2)
    fs = facts.generate(2, seed=0)
    qas = fs.qa(fs.people[0])[:6] + list(facts.GENERAL[:3])
    shared = scoring.candidate_scores(model, tok, [q.prompt for q in qas], [q.candidates for q in qas])
    for q, row in zip(qas, shared, strict=True):
        plain = scoring.answer_scores(model, tok, [q.prompt] * len(q.candidates), list(q.candidates))
        assert row == pytest.approx(plain, abs=1e-2)


def test_resolve_source_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        lm.resolve_source(str(tmp_path), tmp_path / "cache")


@pytest.mark.slow
def test_smollm2_converts_from_the_bundled_gguf_and_knows_simple_facts(tmp_path):
    directory = lm.cached_smollm2(tmp_path)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert lm.cached_smollm2(tmp_path) == directory  # second call reuses the cache
    model, tok = lm.load(directory)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    # it answers easy general knowledge far above the 20% chance level of five candidates
    assert lm_eval.accuracy(model, tok, list(facts.GENERAL[:10])) >= 0.9
