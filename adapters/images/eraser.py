"""The Attentive Eraser (AAS + SARG; ALGORITHMS.md) and, for comparison, plain masked inpainting.

Both run the same loop on the same model, steps, strength and blending; only the noise prediction differs:

1. Start from the source forward-noised to the step `strength` of the way into the schedule (DDIM, eta = 0).
2. Each step, predict the noise. Attentive Eraser: the UNet runs on a doubled batch, the plain branch "wo"
   and the AAS branch "w" (adapters/images/attention.py: object keys masked in the decoder's self-attention,
   or in all of it with `layers="all"`; in-mask queries flattened for the first `suppression_steps`).
   Self-Attention Redirection Guidance mixes them, ``eps = eps_wo + guidance * (eps_w - eps_wo)``; at
   guidance 1 that is eps_w, so only the AAS branch runs (half the cost). Inpainting: one plain prediction.
3. After every step, blend the background back: ``x = (1 - m) * noised(source, t_next) + m * x`` with the
   same noise as the start (the source itself after the last step), m the dilated object mask.
4. Composite the result onto the source: pixels outside the dilated mask are the source's bytes, unchanged;
   inside, the generated pixels, feathered into the source over the mask's outer rim.

`denoise` works on any diffusers UNet in its own input space (pixels for a pixel DDPM, latents for a latent
model); `erase` is the uint8-image wrapper for pixel-space models such as the demo DDPM.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from adapters.images import masks as masks_mod
from adapters.images.attention import LAYERS, Redirection, redirected


@dataclasses.dataclass
class EraserConfig:
    steps: int = 50  # DDIM steps of the full schedule; strength * steps of them run
    strength: float = 0.8  # how far into the schedule the noised source starts (1 = pure noise)
    guidance: float = 9.0  # SARG scale s
    suppression_steps: int = 9  # first steps in which in-mask queries get flattened logits
    similarity_scale: float = 0.3  # the flattening factor of those logits
    layers: str = "decoder"  # self-attention AAS redirects: "decoder" (the paper's) or "all" (encoder, middle too)
    dilate_px: int = 1  # the object mask grows by this much before anything else uses it
    seed: int = 0  # of the noise; the same seed, image and mask always give the same result
    batch_size: int = 16  # images denoised together (benchmarks); results do not depend on it

    def __post_init__(self) -> None:  # messages name the field: config.toml's [methods.attentive_eraser] checks
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, not {self.steps!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength: must lie in (0, 1], not {self.strength!r}")
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"strength: {self.strength} of {self.steps} steps runs no step")
        for name in ("suppression_steps", "dilate_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, not {getattr(self, name)!r}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers: must be one of {', '.join(LAYERS)}, not {self.layers!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, not {self.batch_size!r}")


def _doubled(kwargs: Mapping, batch: int) -> dict:
    """UNet keyword inputs for the doubled batch: tensors with a batch dimension are repeated."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and len(v) == batch else v
            for k, v in kwargs.items()}


@torch.no_grad()
def denoise(unet: nn.Module, x0: torch.Tensor, region: torch.Tensor, scheduler, config: EraserConfig, *,
            attentive: bool = True, unet_kwargs: Mapping | None = None) -> torch.Tensor:
    """Regenerate `region` (bool (B, H, W), already dilated) of `x0` (B, C, H, W, the UNet's input space).

    `scheduler`: a diffusers scheduler with the model's training noise schedule (DDIMScheduler for the
    method as specified). `unet_kwargs`: extra UNet inputs for B samples (e.g. the empty prompt's
    `encoder_hidden_states` of a text-conditioned UNet). Returns the denoised batch in the same space.
    """
    batch = len(x0)
    kwargs = dict(unet_kwargs or {})
    scheduler.set_timesteps(config.steps)
    run = min(int(config.steps * config.strength), config.steps)
    timesteps = scheduler.timesteps[config.steps - run:]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(config.seed))
                         for _ in range(batch)]).to(x0)
    m = region[:, None].to(x0.dtype)
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(batch))
    # SARG at guidance 1 is the AAS branch's own prediction: the plain branch is then not run at all
    doubled = attentive and config.guidance != 1
    redirection = Redirection(region.to(x0.device), config.similarity_scale, with_plain=doubled)
    with redirected(unet, redirection, config.layers) if attentive else contextlib.nullcontext():
        if doubled:
            kwargs = _doubled(kwargs, batch)
        for i, t in enumerate(timesteps):
            if attentive:
                redirection.suppress = i < config.suppression_steps
            if doubled:
                e_wo, e_w = unet(torch.cat([x, x]), t, **kwargs).sample.chunk(2)
                e = sarg(e_wo, e_w, config.guidance)
            else:
                e = unet(x, t, **kwargs).sample
            x = scheduler.step(e, t, x).prev_sample
            background = x0 if i == len(timesteps) - 1 else \
                scheduler.add_noise(x0, noise, timesteps[i + 1:i + 2].repeat(batch))
            x = (1 - m) * background + m * x
    return x


def sarg(eps_wo: torch.Tensor, eps_w: torch.Tensor, guidance: float) -> torch.Tensor:
    """Self-Attention Redirection Guidance: eps_wo + s * (eps_w - eps_wo)."""
    return eps_wo + guidance * (eps_w - eps_wo)


def composite(source: torch.Tensor, generated: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) images: the source outside `region` (bool (B, H, W)), byte for byte; inside, the
    generated pixels, mixed with the source on the region's outer rim (weight = share of region pixels in
    the 3x3 neighbourhood), so the fill meets the background without a hard seam."""
    inside = region[:, None]
    weight = F.avg_pool2d(inside.float(), 3, stride=1, padding=1, count_include_pad=False) * inside
    mixed = (weight * generated.float() + (1 - weight) * source.float()).round().clamp(0, 255).to(torch.uint8)
    return torch.where(inside, mixed, source)


def prepare_region(masks: torch.Tensor, config: EraserConfig) -> torch.Tensor:
    """Object masks (B, H, W) grown by `dilate_px`; refuses a mask that leaves no background."""
    region = masks_mod.dilate(masks, config.dilate_px)
    if bool(region.flatten(1).all(dim=1).any()):
        raise masks_mod.MaskError(f"the mask grown by {config.dilate_px} px covers the whole image: "
                                  "no background is left to fill it from")
    return region


def erase_batch(unet: nn.Module, images: torch.Tensor, masks: torch.Tensor, scheduler, config: EraserConfig, *,
                attentive: bool = True, unet_kwargs: Mapping | None = None) -> torch.Tensor:
    """Erase the masked object from each uint8 image (B, C, H, W) of a pixel-space UNet (inputs in [-1, 1]);
    `masks` bool (B, H, W). Returns uint8 images whose pixels outside the dilated masks are the sources'."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    channels = getattr(getattr(unet, "config", None), "in_channels", images.shape[1])
    if channels != images.shape[1]:
        raise ValueError(f"the model takes {channels}-channel images, this one has {images.shape[1]}")
    region = prepare_region(masks, config)
    device = next(unet.parameters()).device
    out = []
    for start in range(0, len(images), config.batch_size):
        part = slice(start, start + config.batch_size)
        x0 = (images[part].float() / 255 * 2 - 1).to(device)
        kwargs = {k: v[part] if torch.is_tensor(v) and v.ndim and len(v) == len(images) else v
                  for k, v in (unet_kwargs or {}).items()}
        x = denoise(unet, x0, region[part].to(device), scheduler, config, attentive=attentive, unet_kwargs=kwargs)
        generated = ((x.cpu().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        out.append(composite(images[part], generated, region[part]))
    return torch.cat(out)


def erase(unet: nn.Module, image: torch.Tensor, mask: torch.Tensor, scheduler, config: EraserConfig | None = None,
          *, attentive: bool = True) -> torch.Tensor:
    """One uint8 image (C, H, W) with the object under `mask` (bool (H, W)) removed; see `erase_batch`."""
    return erase_batch(unet, image[None], mask[None], scheduler, config or EraserConfig(), attentive=attentive)[0]
