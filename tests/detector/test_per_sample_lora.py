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
