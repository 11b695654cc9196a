"""The Attentive Eraser's engine parts on tiny random UNets: the AAS attention processor, SARG on the
doubled batch, the composite, and the processor on both diffusers UNet families."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from adapters.diffusion import ddpm
from adapters.images import attention, eraser
from adapters.images.masks import dilate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ddpm.DDPMSpec(resolution=16, channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_groups=4,
                     num_classes=None, init_seed=0)
FAST = eraser.EraserConfig(steps=10, strength=0.8, suppression_steps=3)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return ddpm.build(TINY).eval()


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4).eval()


def box_masks(batch: int, size: int = 16, box=(4, 5, 10, 11)) -> torch.Tensor:
    m = torch.zeros(batch, size, size, dtype=torch.bool)
    x0, y0, x1, y1 = box
    m[:, y0:y1, x0:x1] = True
    return m


def images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


# ---- the AAS processor ----------------------------------------------------------------------------------------

def test_masked_keys_get_zero_attention_weight():
    """Background queries of the AAS half do not see masked tokens at all: changing what those tokens hold
    leaves their outputs bit-identical, while the plain half's background outputs do change."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    mask = box_masks(1, size=4, box=(1, 1, 3, 3))  # 4x4 grid of 16 tokens, 4 inside
    redirection = attention.Redirection(mask)
    attn.set_processor(attention.AASProcessor(redirection))
    inside = mask.reshape(-1)
    x = torch.randn(1, 16, 8)
    changed = x.clone()
    changed[:, inside] = torch.randn(1, int(inside.sum()), 8) * 10
    for suppress in (False, True):
        redirection.suppress = suppress
        with torch.no_grad():
            out = attn(torch.cat([x, x]))
            out_changed = attn(torch.cat([changed, changed]))
        assert torch.equal(out[1, ~inside], out_changed[1, ~inside])  # AAS half: masked keys weigh 0
        assert not torch.allclose(out[0, ~inside], out_changed[0, ~inside])  # plain half: they count


def test_in_mask_queries_are_flattened_only_while_suppressing():
    torch.manual_seed(1)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    mask = box_masks(1, size=4, box=(0, 0, 2, 4))
    redirection = attention.Redirection(mask, similarity_scale=0.3)
    attn.set_processor(attention.AASProcessor(redirection))
    x = torch.randn(1, 16, 8)
    q = attn.to_q(x).view(1, 16, 2, 4).transpose(1, 2)
    k = attn.to_k(x).view(1, 16, 2, 4).transpose(1, 2)
    v = attn.to_v(x).view(1, 16, 2, 4).transpose(1, 2)
    bias = torch.zeros(16).masked_fill(mask.reshape(-1), float("-inf"))

    def expected(query_scale):
        logits = (q @ k.transpose(-1, -2)) * attn.scale * query_scale + bias
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 16, 8)
        return attn.to_out[0](out)

    inside = mask.reshape(-1)
    with torch.no_grad():
        redirection.suppress = True
        out = attn(torch.cat([x, x]))[1]
        torch.testing.assert_close(out[inside], expected(0.3)[0, inside])
        torch.testing.assert_close(out[~inside], expected(1.0)[0, ~inside])
        redirection.suppress = False
        torch.testing.assert_close(attn(torch.cat([x, x]))[1], expected(1.0)[0])


def test_layer_whose_tokens_are_all_masked_runs_plain():
    torch.manual_seed(2)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = torch.randn(2, 4, 8)
    plain = attn(x)
    attn.set_processor(attention.AASProcessor(attention.Redirection(torch.ones(1, 2, 2, dtype=torch.bool))))
    out = attn(torch.cat([x[:1], x[:1]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], plain[0])


def test_finds_decoder_self_attention_and_restores_processors(unet, cond_unet):
    for model, expected in ((unet, 2), (cond_unet, 2)):  # attention blocks per up level: layers_per_block + 1
        layers = attention.self_attention_layers(model)
        assert len(layers) == expected and all(n.startswith("up_blocks.") for n, _ in layers)
        assert not any(m.is_cross_attention for _, m in layers)
        with attention.redirected(model, attention.Redirection(box_masks(1))) as names:
            assert names == [n for n, _ in layers]
            assert all(isinstance(m.processor, attention.AASProcessor) for _, m in layers)
        assert all(isinstance(m.processor, AttnProcessor2_0) for _, m in layers)
    cross = [m for n, m in cond_unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert cross and all(isinstance(m.processor, AttnProcessor2_0) for m in cross)


def test_all_layers_adds_the_encoder_and_middle_self_attention(unet, cond_unet):
    for model in (unet, cond_unet):
        self_attention = {n for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention}
        decoder = {n for n, _ in attention.self_attention_layers(model, "decoder")}
        names = [n for n, _ in attention.self_attention_layers(model, "all")]
        assert set(names) == self_attention and decoder < self_attention
        assert {n.split(".")[0] for n in names} == {"down_blocks", "mid_block", "up_blocks"}
        with attention.redirected(model, attention.Redirection(box_masks(1)), "all"):
            assert all(isinstance(model.get_submodule(n).processor, attention.AASProcessor) for n in names)
        assert all(isinstance(model.get_submodule(n).processor, AttnProcessor2_0) for n in names)


def test_model_without_decoder_attention_is_refused():
    no_attention = ddpm.build(ddpm.DDPMSpec(resolution=16, channels=(8, 16), attention_levels=(), norm_groups=4,
                                            num_classes=None))
    with pytest.raises(ValueError, match="no self-attention in its decoder"):
        attention.self_attention_layers(no_attention)
    with pytest.raises(ValueError, match="no self-attention in any block"):
        attention.self_attention_layers(no_attention, "all")
    with pytest.raises(ValueError, match="layers: must be one of decoder, all, not 'encoder'"):
        eraser.EraserConfig(layers="encoder")


# ---- the method -----------------------------------------------------------------------------------------------

def test_outside_the_dilated_mask_is_bit_identical(unet):
    source = images(3)
    masks = box_masks(3)
    out = eraser.erase_batch(unet, source, masks, ddpm.sampling_scheduler(TINY, FAST.steps), FAST)
    region = dilate(masks, FAST.dilate_px)[:, None]
    assert out.dtype == torch.uint8 and out.shape == source.shape
    assert torch.equal(out[~region.expand_as(out)], source[~region.expand_as(source)])
    assert (out[masks[:, None]] != source[masks[:, None]]).float().mean() > 0.5  # the object region is redone


def test_results_do_not_depend_on_batching(unet):
    source, masks = images(3, seed=1), box_masks(3)
    scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
    together = eraser.erase_batch(unet, source, masks, scheduler, FAST)
    one = eraser.erase(unet, source[2], masks[2], scheduler, FAST)
    assert (together[2].int() - one.int()).abs().max() <= 1  # float summation order may move a rounding


def test_doubled_batch_and_sarg(unet):
    """The UNet sees [plain, AAS] copies of the same latents; with guidance s the step uses
    eps_wo + s (eps_w - eps_wo): s = 0 is exactly the plain branch, i.e. plain masked inpainting."""
    seen = []
    hook = unet.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.sample.clone())))
    try:
        x0 = torch.rand(2, 1, 16, 16) * 2 - 1
        region = box_masks(2)
        scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
        eraser.denoise(unet, x0, region, scheduler, FAST, attentive=True)
    finally:
        hook.remove()
    assert len(seen) == int(FAST.steps * FAST.strength)
    for inputs, _eps in seen:
        assert inputs.shape[0] == 4 and torch.equal(inputs[:2], inputs[2:])
    assert not torch.allclose(seen[0][1][:2], seen[0][1][2:])  # AAS changes the prediction
    e_wo, e_w = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(eraser.sarg(e_wo, e_w, 9.0), e_wo + 9.0 * (e_w - e_wo))

    zero = eraser.EraserConfig(**{**FAST.__dict__, "guidance": 0.0})
    plain = eraser.denoise(unet, x0, region, scheduler, zero, attentive=False)
    guided_off = eraser.denoise(unet, x0, region, scheduler, zero, attentive=True)
    torch.testing.assert_close(guided_off, plain, atol=1e-4, rtol=0)
    full = eraser.denoise(unet, x0, region, scheduler, FAST, attentive=True)
    assert (full - plain).abs().max() > 1e-2


def test_guidance_one_runs_the_aas_branch_alone(unet):
    """At guidance 1 SARG's eps is eps_w: the UNet sees B (not 2B) latents, and the result is what the doubled
    run's AAS half gives (which guidance 1 + a hair, still doubled, reproduces)."""
    seen = []
    hook = unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    region = box_masks(2)
    scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
    one = eraser.EraserConfig(**{**FAST.__dict__, "guidance": 1.0})
    try:
        alone = eraser.denoise(unet, x0, region, scheduler, one, attentive=True)
    finally:
        hook.remove()
    assert seen and set(seen) == {2}
    doubled = eraser.denoise(unet, x0, region, scheduler,
                             eraser.EraserConfig(**{**FAST.__dict__, "guidance": 1.0 + 1e-9}), attentive=True)
    torch.testing.assert_close(alone, doubled, atol=1e-4, rtol=0)
    plain = eraser.denoise(unet, x0, region, scheduler, one, attentive=False)
    assert (alone - plain).abs().max() > 1e-2  # the AAS branch, not the plain one


def test_layers_setting_reaches_the_encoder(unet):
    """`layers="all"` runs AAS in the encoder's self-attention during denoising; the default leaves it plain."""
    encoder = next(m for n, m in unet.named_modules() if n.startswith("down_blocks") and isinstance(m, Attention))
    seen: list[bool] = []
    hook = encoder.register_forward_pre_hook(
        lambda m, args: seen.append(isinstance(m.processor, attention.AASProcessor)))
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    region = box_masks(2)
    scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
    try:
        outs = {}
        for layers in ("decoder", "all"):
            seen.clear()
            config = eraser.EraserConfig(**{**FAST.__dict__, "layers": layers})
            outs[layers] = eraser.denoise(unet, x0, region, scheduler, config)
            assert seen and set(seen) == {layers == "all"}
    finally:
        hook.remove()
    assert (outs["all"] - outs["decoder"]).abs().max() > 1e-3
    torch.testing.assert_close(outs["all"][:, :, ~region[0]], x0[:, :, ~region[0]])


def test_background_is_blended_back_every_step(unet):
    x0 = torch.rand(1, 1, 16, 16) * 2 - 1
    region = box_masks(1)
    out = eraser.denoise(unet, x0, region, ddpm.sampling_scheduler(TINY, FAST.steps), FAST)
    torch.testing.assert_close(out[:, :, ~region[0]], x0[:, :, ~region[0]])


def test_works_on_a_text_conditioned_unet(cond_unet):
    source, masks = images(2, seed=3), box_masks(2)
    null_prompt = torch.zeros(2, 3, 8)  # the empty prompt's embedding stands in for text guidance off
    scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
    out = eraser.erase_batch(cond_unet, source, masks, scheduler, FAST,
                             unet_kwargs={"encoder_hidden_states": null_prompt})
    outside = ~dilate(masks, FAST.dilate_px)[:, None].expand_as(out)
    assert torch.equal(out[outside], source[outside])
    baseline = eraser.erase_batch(cond_unet, source, masks, scheduler, FAST, attentive=False,
                                  unet_kwargs={"encoder_hidden_states": null_prompt})
    assert not torch.equal(out, baseline)


def test_config_and_input_checks(unet):
    with pytest.raises(ValueError, match="strength"):
        eraser.EraserConfig(strength=0)
    with pytest.raises(ValueError, match="runs no step"):
        eraser.EraserConfig(steps=2, strength=0.3)
    scheduler = ddpm.sampling_scheduler(TINY, FAST.steps)
    with pytest.raises(ValueError, match="uint8"):
        eraser.erase_batch(unet, images(1).float(), box_masks(1), scheduler, FAST)
    with pytest.raises(ValueError, match="3-channel|1-channel"):
        eraser.erase_batch(unet, images(1).expand(1, 3, 16, 16).contiguous(), box_masks(1), scheduler, FAST)
    with pytest.raises(ValueError, match="whole image"):
        eraser.erase_batch(unet, images(1), box_masks(1, box=(1, 1, 15, 15)), scheduler, FAST)


def test_composite_feathers_only_inside_the_region():
    source = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    generated = torch.full_like(source, 200)
    region = torch.zeros(1, 8, 8, dtype=torch.bool)
    region[:, 2:6, 2:6] = True
    out = eraser.composite(source, generated, region)
    assert torch.equal(out[0, 0, ~region[0]], source[0, 0, ~region[0]])
    assert int(out[0, 0, 3, 3]) == 200 and 0 < int(out[0, 0, 2, 2]) < 200
