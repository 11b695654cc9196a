"""Device and dtype per model: names resolve or fail clearly, bf16 models train and serve, CUDA runs where present."""

from __future__ import annotations

import pytest
import torch

from adapters import devices
from adapters.base import Forget
from adapters.lm import lora_set
from adapters.lm.o3 import LMTarget, O3Engine
from detector.per_sample_lora import per_sample_adapters
from detector.routed_model import RoutedModel, Routing
from tests.tiny_models import tiny_llama

CUDA = torch.cuda.is_available()


def test_device_and_dtype_names():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert devices.check_device("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:x", "", "CPU"):
        with pytest.raises(ValueError, match="device must be"):
            devices.check_device(bad)
    assert devices.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        devices.resolve_dtype("float8")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        devices.resolve_device("cuda")


def _tiny_dir(tmp_path):
    tiny_llama(tmp_path / "tiny", seed=0)
    return tmp_path / "tiny"


def _o3_round_trip(tmp_path, device: str, dtype: str):
    """Two O3 requests (the second with the penalty against the first) and routed serving, on `device`/`dtype`."""
    from bench.evaluation import facts

    fs = facts.generate(2, seed=0)
    target = LMTarget("tiny", _tiny_dir(tmp_path), device=device, dtype=dtype).load()
    assert devices.device_of(target.model).type == torch.device(device).type
    assert next(target.model.parameters()).dtype == devices.resolve_dtype(dtype)
    engine = O3Engine(epochs=1, batch_size=8, lr=1e-2, measure=False)
    for i, person in enumerate(fs.people):
        change = engine.apply(target, Forget(qa=tuple((q.question, q.answer) for q in fs.qa(person)[:10])))
        out = tmp_path / f"a{i}"
        out.mkdir()
        change.save(out)
        target.adapters[f"a{i}"] = out
    assert change.metrics["earlier_adapters"] == 1 and change.metrics["train_loss"] == change.metrics["train_loss"]
    served = lora_set.attach(target.model, {"a0": tmp_path / "a0"})
    routed = RoutedModel(served, target.tokenizer, router=None)
    before = {n: p.detach().clone() for n, p in served.named_parameters()}
    routed_text = routed.generate("Question: who?\nAnswer:", Routing({"a0": 0.9}), templated=False).text
    with per_sample_adapters(served, [{}]):
        base = served.generate(**routed._encode("Question: who?\nAnswer:", False), max_new_tokens=8, do_sample=False,
                               pad_token_id=target.tokenizer.pad_token_id)
    plain = routed.generate("Question: who?\nAnswer:", Routing(), templated=False)
    assert plain.completion_tokens > 0 and isinstance(routed_text, str)
    assert base.device.type == torch.device(device).type
    assert all(torch.equal(p, before[n]) for n, p in served.named_parameters())  # merged and restored exactly


def test_a_bfloat16_model_trains_o3_with_the_penalty_and_serves(tmp_path):
    _o3_round_trip(tmp_path, "cpu", "bfloat16")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_cuda(tmp_path):
    _o3_round_trip(tmp_path, "cuda", "bfloat16")
    from detector.features import Encoder

    model, tok = tiny_llama(seed=1)
    enc = Encoder(model=model.get_decoder(), tokenizer=tok, device="cuda")
    assert enc.encode(["a question", "another"]).shape[0] == 2
