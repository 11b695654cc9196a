"""The batched orthogonality penalty equals the per-module, per-adapter loop, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adapters.lm import lora_set
from adapters.lm.o3 import LLAMA_LINEAR
from adapters.lm.penalty import batched_penalty, looped_penalty
from tests.tiny_models import tiny_llama


def _lora(rank: int, targets) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights="gaussian")


def _both(peft_model, earlier, n_layers):
    looped, batched = looped_penalty(peft_model, earlier, n_layers), batched_penalty(peft_model, earlier, n_layers)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    values, grads = [], []
    for fn in (looped, batched):
        value = fn()
        values.append(value.item())
        grads.append(torch.autograd.grad(value, params, allow_unused=True))
    return values, grads


def _assert_equal(values, grads):
    assert values[0] > 0
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    for g_loop, g_batch in zip(*grads, strict=True):
        if g_loop is None:
            assert g_batch is None or not g_batch.any()
        else:
            torch.testing.assert_close(g_batch, g_loop, rtol=1e-5, atol=1e-6 * g_loop.abs().max().item())


def test_equal_to_the_loop_on_random_adapters_of_mixed_ranks_and_modules():
    model, _ = tiny_llama(seed=1, hidden=48, layers=3)
    peft_model = get_peft_model(model, _lora(8, LLAMA_LINEAR))
    keys = sorted(k for n, _ in peft_model.named_parameters() if (k := lora_set.module_key(n)))
    live = {k: p for n, p in peft_model.named_parameters() if (k := lora_set.module_key(n))}
    g = torch.Generator().manual_seed(0)
    earlier = []
    for i, rank in enumerate((8, 4, 8, 16, 2)):  # ranks differ; some adapters cover only part of the modules
        covered = keys if i % 2 == 0 else keys[i::3]
        earlier.append({k: torch.randn(rank, live[k].shape[1], generator=g) for k in covered})
    _assert_equal(*_both(peft_model, earlier, 3))
    peft_model.unload()


def test_equal_to_the_loop_on_saved_peft_adapters(tmp_path):
    model, _ = tiny_llama(seed=2)
    dirs = []
    for i, (rank, targets) in enumerate(((8, LLAMA_LINEAR), (4, ("q_proj", "v_proj")), (8, ("down_proj", "up_proj")))):
        torch.manual_seed(10 + i)
        adapter = get_peft_model(model, _lora(rank, targets))
        dirs.append(tmp_path / f"a{i}")
        adapter.save_pretrained(dirs[-1])
        model = adapter.unload()
    earlier = [lora_set.read_lora_A(d) for d in dirs]
    torch.manual_seed(99)
    peft_model = get_peft_model(model, _lora(8, LLAMA_LINEAR))
    _assert_equal(*_both(peft_model, earlier, model.config.num_hidden_layers))


def test_no_shared_module_gives_zero():
    model, _ = tiny_llama(seed=3)
    peft_model = get_peft_model(model, _lora(4, ("q_proj",)))
    earlier = [{"model.layers.0.mlp.down_proj": torch.ones(4, 128)}]
    assert batched_penalty(peft_model, earlier, 2)().item() == 0.0
