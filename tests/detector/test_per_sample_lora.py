"""Per-sample adapter weights in one batch equal applying each sample alone with peft's own per-adapter scale."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from detector.per_sample_lora import per_sample_adapters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    m = get_peft_model(LlamaForCausalLM(cfg).eval(), lora(), adapter_name="a1")
    m.add_adapter("a2", lora())
    return m.eval()


def _alone(model, ids, route):
    """Reference: one sample, peft's own mechanism (active adapters, per-adapter `scaling` times w)."""
    if not route:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.base_model.set_adapter(sorted(route))
    saved = []
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name, w in route.items():
                saved.append((layer, name, layer.scaling[name]))
                layer.scaling[name] = layer.scaling[name] * w
    try:
        return model(input_ids=ids).logits
    finally:
        for layer, name, s in saved:
            layer.scaling[name] = s
        model.base_model.set_adapter("a1")


@torch.no_grad()
def test_batched_per_sample_weights_match_each_alone(model):
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    routes = [{"a1": 0.7}, {}, {"a1": 0.3, "a2": 1.0}, {"a2": 0.5}]
    with per_sample_adapters(model, routes):
        batched = model(input_ids=ids).logits
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    for i, route in enumerate(routes):
        torch.testing.assert_close(batched[i:i + 1], _alone(model, ids[i:i + 1], route), rtol=1e-5, atol=1e-5)
        moved = (batched[i] - base[i]).abs().max().item()
        assert (moved > 1e-3) == bool(route)  # routed samples change, the unrouted one is the base model
    assert model.base_model.active_adapters == ["a1"]  # state restored after the block


@torch.no_grad()
def test_generate_with_mixed_routes(model):
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    routes = [{"a2": 1.0}, {}]
    with per_sample_adapters(model, routes):
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        plain = model.generate(input_ids=ids[1:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1:], plain)
    with pytest.raises(KeyError):
        with per_sample_adapters(model, [{"nope": 1.0}]):
            pass


@torch.no_grad()
def test_a_batch_sharing_its_route_runs_merged_equal_to_per_sample_and_restores_base_weights(model):
    from detector.per_sample_lora import merged_adapters

    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = {n: p.data_ptr() for n, p in model.named_parameters()}
    for route in ({"a1": 1.0}, {"a1": 1.0, "a2": 1.0}, {"a2": 0.6}):
        with per_sample_adapters(model, [route] * 3):  # the merged fast path
            merged = model(input_ids=ids).logits
            lora_layers = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
        assert lora_layers == 0  # no LoRA code runs while merged: the wrappers are out of the module tree
        for i in range(3):
            torch.testing.assert_close(merged[i:i + 1], _alone(model, ids[i:i + 1], route), rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():  # base weights back, bit for bit, as the very same tensors
        assert p.data_ptr() == tensors[n] and torch.equal(p, before[n])
    with pytest.raises(RuntimeError, match="inside"):
        with merged_adapters(model, {"a1": 1.0}):
            raise RuntimeError("inside")
    for n, p in model.named_parameters():  # also after an exception inside the block
        assert p.data_ptr() == tensors[n]
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert sum(1 for m in model.modules() if isinstance(m, LoraLayer)) == 6  # every wrapper back in place


@torch.no_grad()
def test_merged_generation_matches_the_unmerged_route(model):
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with per_sample_adapters(model, [{"a2": 1.0}]):
        fast = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    # the unmerged reference: the same route in a two-row batch next to an unrouted row (per-sample hooks)
    with per_sample_adapters(model, [{"a2": 1.0}, {}]):
        slow = model.generate(input_ids=ids.repeat(2, 1), max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    assert torch.equal(fast.sequences[0], slow.sequences[0])
    for a, b in zip(fast.scores, slow.scores, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
