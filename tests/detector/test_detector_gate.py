"""A request's gate: fit on real MiniLM features, persisted with safetensors/JSON/FAISS, reloaded identically."""

import json

import numpy as np
from safetensors.numpy import load_file

from adapters.base import Forget
from adapters.lm.o3 import gate_texts
from bench.evaluation import facts
from detector.gate import RequestGate, fit_request_gate
from detector.router import Router


def asked(qas):
    """What a gate is fitted on and the router sees: the questions as users ask them (adapters.lm.o3.gate_texts)."""
    return gate_texts(Forget(qa=tuple((q.question, q.answer) for q in qas)))


def test_fit_persist_load_round_trip(tmp_path, encoder, fact_set):
    fs, split = fact_set
    person = split.forget[0]
    texts = asked(fs.qa(person))
    metrics = fit_request_gate(texts, tmp_path / "gate", encoder, adapter_id="m/a1")
    assert metrics["n_used"] + metrics["n_rest"] == len(texts) and metrics["n_rest"] >= 1
    files = sorted(p.name for p in (tmp_path / "gate").iterdir())
    # The default gate scores the encoder's last layer only (GATE_LAYERS; the measurement is in gate.py).
    assert files == [f"bank_l{encoder.n_layers - 1}.faiss", "gate.json", "gate.safetensors"]
    # No raw forget text anywhere on disk: only features and scalars.
    blob = b"".join((tmp_path / "gate" / f).read_bytes() for f in files)
    assert person.name.encode() not in blob and b"born" not in blob
    assert set(load_file(str(tmp_path / "gate" / "gate.safetensors"))) >= {"svm_coef", "svm_intercept", "l0.basis"}
    assert json.loads((tmp_path / "gate" / "gate.json").read_text())["adapter_id"] == "m/a1"

    gate = RequestGate.load(tmp_path / "gate")
    probe = encoder.encode(asked(fs.qa(person, held_out=True)) + asked(facts.GENERAL[:5]))
    again = RequestGate.load(tmp_path / "gate")
    np.testing.assert_allclose(gate.z(probe), again.z(probe), rtol=1e-6)
    assert gate.banks[0].ntotal == metrics["n_used"] + metrics["n_rest"]  # D_rest joins the bank after calibration


def test_all_layer_gate_round_trip_and_format_1_still_loads(tmp_path, encoder, fact_set):
    fs, split = fact_set
    person = split.forget[0]
    fit_request_gate(asked(fs.qa(person)), tmp_path / "gate", encoder, adapter_id="m/all", layers=None)
    gate = RequestGate.load(tmp_path / "gate")
    assert gate.layers == tuple(range(encoder.n_layers))
    assert sorted(p.name for p in (tmp_path / "gate").glob("bank_l*.faiss")) == [
        f"bank_l{i}.faiss" for i in range(encoder.n_layers)]
    probe = encoder.encode(asked(fs.qa(person, held_out=True)))
    # A gate written before `layers` existed (format 1) scored every layer: it must load as exactly that.
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    meta.pop("layers")
    meta["format_version"] = 1
    (tmp_path / "gate" / "gate.json").write_text(json.dumps(meta))
    old = RequestGate.load(tmp_path / "gate")
    assert old.layers == gate.layers
    np.testing.assert_allclose(old.z(probe), gate.z(probe), rtol=1e-6)


def test_forget_like_inputs_get_high_weight_unrelated_low(encoder, fact_set, tmp_path):
    fs, split = fact_set
    person = split.forget[1]
    fit_request_gate(asked(fs.qa(person)), tmp_path, encoder, adapter_id="m/a2")
    gate = RequestGate.load(tmp_path)
    w_train = gate.weight(encoder.encode(asked(fs.qa(person))))
    w_held = gate.weight(encoder.encode(asked(fs.qa(person, held_out=True))))
    w_retained = gate.weight(encoder.encode(asked(fs.qa_of(split.retain[:3], held_out=True))))
    w_general = gate.weight(encoder.encode(asked(facts.GENERAL)))
    assert np.median(w_train) > 0.9
    assert np.median(w_held) > 0.5  # paraphrases never seen by the gate
    assert w_general.max() < 0.25 and np.median(w_retained) < 0.25


def test_gram_ledoit_wolf_equals_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    from detector.gaussian import ledoit_wolf_shrinkage_gram

    rng = np.random.default_rng(0)
    for n, d in [(8, 384), (17, 384), (60, 20)]:
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
        xc = x - x.mean(0)
        assert abs(ledoit_wolf_shrinkage_gram(xc) - ledoit_wolf_shrinkage(xc, assume_centered=True)) < 1e-9


def test_too_few_distinct_texts_are_refused_and_the_smallest_sound_gate_is_finite(encoder):
    """The README once sent 2 QA pairs: its gate had sd 0 and a NaN calibration, and routed nothing. A gate
    needs MIN_GATE_TEXTS distinct inputs; below that (duplicates and case variants do not count: the encoder is
    uncased) fitting refuses with a reason instead of producing a NaN gate."""
    import pytest

    from detector.gate import MIN_GATE_TEXTS, UnsoundGate, fit_gate_from_features

    two = ["Who wrote The Glass Orchard?", "Which book by Maren Tolliver won the Halden Prize?"]
    with pytest.raises(UnsoundGate, match="at least 4"):
        fit_gate_from_features(encoder.encode(two), "m/two")
    same = ["What is the capital of France?", "what is the capital of France?", "WHAT IS THE CAPITAL OF FRANCE?",
            "Which city is the capital of France?"]
    with pytest.raises(UnsoundGate):
        fit_gate_from_features(encoder.encode(same), "m/same")
    four = ["What is the capital of France?", "Which city is the capital of France?", "Name the capital of France.",
            "Tell me the capital of France."]
    assert len(four) == MIN_GATE_TEXTS
    gate = fit_gate_from_features(encoder.encode(four), "m/four")
    assert all(np.isfinite(v) for v in gate.calibration.to_json().values())
    router = Router(encoder)
    router.add_gate("m/four", gate)
    probes = four + [
        "Which city is France's capital?",
        "What is the capital of Germany?",
        "How many legs does a spider have?",
    ]
    assert np.all(np.isfinite(gate.weight(encoder.encode(probes))))
    assert [bool(r) for r in router.route(probes)] == [True] * 5 + [False] * 2
