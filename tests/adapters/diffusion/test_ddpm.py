import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from adapters.diffusion import ddpm

from .conftest import TINY, state


def test_spec_round_trips_through_json_types():
    values = TINY.to_dict()
    values["channels"] = list(values["channels"])  # what JSON gives back
    assert ddpm.DDPMSpec.from_dict(values) == TINY
    with pytest.raises(ValueError, match="unknown DDPM spec key"):
        ddpm.DDPMSpec.from_dict({**values, "bogus": 1})


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    rng = torch.random.get_rng_state()
    a, b = state(ddpm.build(TINY)), state(ddpm.build(TINY))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = state(ddpm.build(dataclasses.replace(TINY, init_seed=1)))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_weights_reload_exactly_from_safetensors(tmp_path, tiny_model):
    save_file(ddpm.state_of(tiny_model), str(tmp_path / ddpm.WEIGHTS_FILE))
    loaded = ddpm.load_weights(TINY, tmp_path / ddpm.WEIGHTS_FILE)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        assert torch.equal(ddpm.eps(loaded, x, t, y), ddpm.eps(tiny_model, x, t, y))


def test_sampling_is_deterministic_and_independent_of_batch_size(tiny_model):
    labels = [0, 1, 2, 3, 4]
    a = ddpm.sample(tiny_model, TINY, labels, steps=3, seed=7, batch_size=2)
    b = ddpm.sample(tiny_model, TINY, labels, steps=3, seed=7, batch_size=64)
    assert a.shape == (5, 1, 8, 8) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, ddpm.sample(tiny_model, TINY, labels, steps=3, seed=8))
    assert not torch.allclose(a, ddpm.sample(tiny_model, TINY, labels, steps=3, seed=7, guidance=1.0))


def test_sampling_rejects_labels_outside_the_model(tiny_model):
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        ddpm.sample(tiny_model, TINY, [10], steps=2)
    with pytest.raises(ValueError, match="needs labels"):
        ddpm.sample(tiny_model, TINY, steps=2)


def test_unconditional_model_builds_trains_and_samples():
    spec = dataclasses.replace(TINY, num_classes=None)
    model = ddpm.build(spec)
    assert model.class_embedding is None
    loss = ddpm.diffusion_loss(model, ddpm.noise_scheduler(spec), torch.rand(4, 1, 8, 8) * 2 - 1, None)
    loss.backward()
    assert ddpm.sample(model, spec, n=3, steps=2).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="no null class"):
        _ = spec.null_label


def test_images_map_to_model_space_and_back():
    images = torch.rand(2, 1, 28, 28)
    x = ddpm.to_model_space(images, TINY)
    assert x.shape == (2, 1, 8, 8) and -1 <= float(x.min()) and float(x.max()) <= 1
    same = ddpm.to_model_space(torch.rand(2, 1, 8, 8), TINY)
    assert torch.allclose(ddpm.to_pixels(same) * 2 - 1, same, atol=1e-6)


def test_bad_architectures_are_refused():
    with pytest.raises(ValueError, match="attention_levels"):
        ddpm.build(dataclasses.replace(TINY, attention_levels=(5,)))
    with pytest.raises(ValueError, match="divisible"):
        ddpm.build(dataclasses.replace(TINY, resolution=9))


def test_decoder_attention_levels_default_to_the_encoders_and_can_differ():
    assert "decoder_attention_levels" not in TINY.to_dict()  # specs recorded before the field read the same
    same = dataclasses.replace(TINY, decoder_attention_levels=TINY.attention_levels)
    assert state(ddpm.build(same)).keys() == state(ddpm.build(TINY)).keys()
    decoder_only = dataclasses.replace(TINY, attention_levels=(), decoder_attention_levels=(0, 1))
    model = ddpm.build(decoder_only)
    assert [type(b).__name__ for b in model.down_blocks] == ["DownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in model.up_blocks] == ["AttnUpBlock2D", "AttnUpBlock2D"]
    values = decoder_only.to_dict()
    values["decoder_attention_levels"] = list(values["decoder_attention_levels"])
    assert ddpm.DDPMSpec.from_dict(values) == decoder_only
    with pytest.raises(ValueError, match="outside the UNet's levels"):
        ddpm.build(dataclasses.replace(TINY, decoder_attention_levels=(2,)))
