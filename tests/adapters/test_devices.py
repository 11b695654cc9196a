"""Device and dtype per model: names resolve or fail clearly, bf16 models train and serve, CUDA runs where present."""

from __future__ import annotations

import math

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


# ---- classifiers and DDPMs: the same engines, on the model's device ---------------------------------------------

def _saved_on_the_cpu(change, spec, directory, device: torch.device, load) -> dict[str, torch.Tensor]:
    """The change's file, as every later start reads it: CPU float32 tensors equal to the weights on the device."""
    from safetensors.torch import load_file

    directory.mkdir(parents=True)
    change.save(directory)
    module = change.module(spec)
    assert devices.device_of(module).type == device.type
    saved = load_file(str(directory / "model.safetensors"))
    assert saved.keys() == module.state_dict().keys()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in saved.values())
    assert all(torch.equal(saved[k], v.cpu()) for k, v in module.state_dict().items())
    assert devices.device_of(load(directory)).type == "cpu"  # and it loads back where no GPU is
    assert all(math.isfinite(v) for v in change.metrics.values()), change.metrics
    return saved


def _classifier_round_trip(tmp_path, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny digits MLP trained on `device`, then IAU (a class, then samples through the cached gradient) and
    SalUn (a class) as the daemon runs them: the version read from its file onto the device, each change saved and
    read back on the CPU. Returns each change's saved weights."""
    import dataclasses

    from adapters import datasets
    from adapters.classifier import measures
    from adapters.classifier import model as classifier
    from adapters.classifier.iau import IAUEngine
    from adapters.classifier.salun import SalUnEngine

    where = devices.resolve_device(device)
    split = datasets.digits(seed=0)
    spec = {"arch": "mlp", "input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "hidden": [64, 32], "init_seed": 0}
    trained = classifier.train_gr(classifier.build(spec).to(where), split.train, epochs=30, seed=0)
    (tmp_path / "v1").mkdir(parents=True)
    classifier.WeightChange(classifier.state_of(trained), {}).save(tmp_path / "v1")
    target = classifier.ClassifierTarget("tiny", "v1", spec, classifier.load_weights(spec, tmp_path / "v1", where),
                                         split)
    assert devices.device_of(target.model).type == where.type
    load = lambda directory: classifier.load_weights(spec, directory)  # noqa: E731
    saved, iau = {}, IAUEngine()

    change = iau.apply(target, Forget(class_label=3))
    saved["iau-class"] = _saved_on_the_cpu(change, spec, tmp_path / "iau-class", where, load)
    m = change.metrics
    assert m["forget_acc_before"] > 0.85 and m["forget_acc_after"] < m["forget_acc_before"] - 0.3, m
    assert m["retain_acc_after"] >= m["retain_acc_before"] - 0.05, m
    gone = split.train.subset(split.train.y == 3)
    assert measures.accuracy(load(tmp_path / "iau-class"), gone) == pytest.approx(m["forget_acc_after"], abs=0.02)

    after = dataclasses.replace(target, model=change.module(spec), version="v2",
                                forgotten=frozenset(change.forgotten_ids))
    samples = tuple(split.train.ids[split.train.y != 3][:60].tolist())
    change = iau.apply(after, Forget(sample_ids=samples))  # the remaining-set gradient from the cache, on the device
    iau.wait_for_refresh()
    saved["iau-samples"] = _saved_on_the_cpu(change, spec, tmp_path / "iau-samples", where, load)
    assert change.metrics["gradient_cached"] == 1.0
    assert change.metrics["forget_acc_after"] <= change.metrics["forget_acc_before"]

    change = SalUnEngine().apply(target, Forget(class_label=5))
    saved["salun-class"] = _saved_on_the_cpu(change, spec, tmp_path / "salun-class", where, load)
    m = change.metrics
    assert m["forget_acc_before"] > 0.85 and m["forget_acc_after"] <= 0.05, m
    assert m["retain_acc_after"] >= m["retain_acc_before"] - 0.05, m
    assert 0.45 <= m["masked_share"] <= 0.55
    return saved


def _ddpm_round_trip(tmp_path, device: str) -> None:
    """A tiny class-conditional DDPM and its judge trained on `device`, then SalUn forgets a class there."""
    from adapters import datasets
    from adapters.diffusion import ddpm, judge, training
    from adapters.diffusion.salun import DiffusionSalUnEngine
    from adapters.diffusion.target import DDPMWeightChange, DiffusionTarget

    where = devices.resolve_device(device)
    split = datasets.digits(seed=0)
    keep = torch.cat([torch.nonzero(split.train.y == c).flatten()[:16] for c in range(split.num_classes)])
    data = datasets.Split(split.train.subset(keep.sort().values), split.test, split.num_classes, split.input_shape)
    spec = ddpm.DDPMSpec(resolution=8, channels=(8, 16), attention_levels=(1,), attention_head_dim=4, norm_groups=4)
    model = training.train(ddpm.build(spec).to(where), spec, ddpm.to_model_space(data.train.x, spec), data.train.y,
                           training.TrainConfig(steps=30, batch_size=32, warmup_steps=5))
    (tmp_path / "v1").mkdir(parents=True)
    DDPMWeightChange(ddpm.state_of(model), {}).save(tmp_path / "v1")
    weights = ddpm.load_weights(spec, tmp_path / "v1" / ddpm.WEIGHTS_FILE, where)
    target = DiffusionTarget("tiny-ddpm", "v1", spec, weights, data,
                             judge.train_judge(spec, data.train, epochs=2, device=where))
    assert devices.device_of(target.model).type == where.type == devices.device_of(target.judge).type
    # alpha = 0: the forgetting term alone, which a few steps must lower (the tiny model draws no digits yet)
    change = DiffusionSalUnEngine(steps=30, batch_size=8, alpha=0.0, measure_per_class=2, measure_steps=2).apply(
        target, Forget(class_label=3))
    _saved_on_the_cpu(change, spec, tmp_path / "salun", where,
                      lambda directory: ddpm.load_weights(spec, directory / ddpm.WEIGHTS_FILE))
    assert change.metrics["forget_loss_after"] < 0.5 * change.metrics["forget_loss_before"], change.metrics
    assert set(change.forgotten_ids) == set(data.train.ids[data.train.y == 3].tolist())


def test_classifier_engines_run_on_the_configured_cpu_the_same_every_time(tmp_path):
    """device = "cpu" goes through the placement a GPU gets (weights read onto the device, rows moved there,
    random draws on the CPU), and gives the same weights on every run."""
    first = _classifier_round_trip(tmp_path / "a", "cpu")
    again = _classifier_round_trip(tmp_path / "b", "cpu")
    assert all(torch.equal(first[c][k], again[c][k]) for c in first for k in first[c])


def test_ddpm_salun_on_the_configured_cpu(tmp_path):
    _ddpm_round_trip(tmp_path, "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_classifier_and_ddpm_engines_on_cuda(tmp_path):
    _classifier_round_trip(tmp_path / "classifier", "cuda")
    _ddpm_round_trip(tmp_path / "ddpm", "cuda")
