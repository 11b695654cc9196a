"""Small DDPMs for unlearning: the model spec, building and loading the UNet, the diffusion loss, sampling.

Shared by every DDPM-based model kind (class-conditional for SalUn, unconditional with self-attention for the
Attentive Eraser). A model is described by a JSON-able `DDPMSpec` kept in each version's meta, so any version
can be rebuilt from its safetensors file alone, exactly like the classifiers (adapters/classifier/model.py).

- Network: diffusers' `UNet2DModel`; class conditioning through its `num_class_embeds` table (added to the
  timestep embedding). With `null_class`, the table has one extra row (index `num_classes`) that stands for
  "no class": training drops labels to it with probability `label_dropout`, and sampling mixes the two
  predictions (classifier-free guidance): ``eps = eps(null) + g * (eps(c) - eps(null))``.
- Training noise: diffusers' `DDPMScheduler` (epsilon prediction); sampling: `DDIMScheduler` (deterministic,
  eta = 0) on the same betas, with "trailing" timestep spacing so few steps still start from pure noise.
- Pixels: images in [0, 1] at any size are resized to the model's resolution and mapped to [-1, 1]
  (`to_model_space`); samples come back in [0, 1] (`to_pixels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class DDPMSpec:
    """Architecture and noise schedule of one DDPM. `attention_levels` are the UNet levels (0 = full
    resolution) whose blocks carry self-attention; the middle block has attention whenever any level does.
    `decoder_attention_levels`, when set, gives the decoder (up path) its own levels, e.g. attention at full
    resolution on the way up only (what attention editing such as the Attentive Eraser acts on)."""

    resolution: int = 16
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)
    decoder_attention_levels: tuple[int, ...] | None = None  # None: the same as attention_levels
    attention_head_dim: int = 8
    norm_groups: int = 8
    num_classes: int | None = 10  # None: an unconditional model
    null_class: bool = True  # an extra "no class" embedding for classifier-free guidance
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    init_seed: int = 0

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def classes(self) -> int:
        """The number of classes of a class-conditional model (raises ValueError for an unconditional one)."""
        if self.num_classes is None:
            raise ValueError("an unconditional model has no classes")
        return self.num_classes

    @property
    def null_label(self) -> int:
        if not (self.conditional and self.null_class):
            raise ValueError("this model has no null class (no classifier-free guidance)")
        return self.classes

    def to_dict(self) -> dict:
        """The spec as JSON-able values. An unset `decoder_attention_levels` is left out, so the specs recorded
        before it existed (ledger infos, saved metas) read back and compare the same."""
        values = dataclasses.asdict(self)
        if values["decoder_attention_levels"] is None:
            del values["decoder_attention_levels"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> DDPMSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DDPM spec key(s) {sorted(unknown)}; known: {sorted(known)}")
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


def _construct(spec: DDPMSpec) -> UNet2DModel:
    levels = range(len(spec.channels))
    attn = set(spec.attention_levels)
    up_attn = attn if spec.decoder_attention_levels is None else set(spec.decoder_attention_levels)
    for key, chosen in (("attention_levels", attn), ("decoder_attention_levels", up_attn)):
        if not chosen <= set(levels):
            raise ValueError(f"{key} {sorted(chosen)} outside the UNet's levels 0..{len(spec.channels) - 1}")
    if spec.resolution % 2 ** (len(spec.channels) - 1):
        raise ValueError(f"resolution {spec.resolution} must be divisible by 2^{len(spec.channels) - 1}")
    embeds = None
    if spec.conditional:
        embeds = spec.classes + (1 if spec.null_class else 0)
    return UNet2DModel(
        sample_size=spec.resolution,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        block_out_channels=tuple(spec.channels),
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in up_attn else "UpBlock2D" for i in reversed(levels)),
        layers_per_block=spec.layers_per_block,
        add_attention=bool(attn | up_attn),
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_groups,
        num_class_embeds=embeds,
    )


def build(spec: DDPMSpec) -> UNet2DModel:
    """An untrained UNet, initialised deterministically from `spec.init_seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return _construct(spec)


def with_weights(spec: DDPMSpec, state: dict[str, torch.Tensor]) -> UNet2DModel:
    """The architecture of `spec` holding exactly `state` (built on the meta device: no wasted init)."""
    with torch.device("meta"):
        module = _construct(spec)
    module.load_state_dict(state, assign=True)
    return module.eval()


def load_weights(spec: DDPMSpec, path, device: torch.device | str = "cpu") -> UNet2DModel:
    """A version's weights, read straight onto `device` (the model's configured device)."""
    from safetensors.torch import load_file

    return with_weights(spec, load_file(str(path), device=str(device)))


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's weights on the CPU, as they are saved: the file is the same whatever the device."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


# ---- schedules and pixels -------------------------------------------------------------------------------------

def noise_scheduler(spec: DDPMSpec) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def sampling_scheduler(spec: DDPMSpec, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                              prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


def to_model_space(images: torch.Tensor, spec: DDPMSpec) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) of any size -> the model's resolution in [-1, 1]."""
    if images.shape[-1] != spec.resolution or images.shape[-2] != spec.resolution:
        images = F.interpolate(images, size=(spec.resolution, spec.resolution), mode="bilinear", antialias=True,
                               align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


# ---- loss -----------------------------------------------------------------------------------------------------

def noised(scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise) for clean images x0 at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=x0.device)
    return scheduler.add_noise(x0, noise, t), t, noise


def eps(model: UNet2DModel, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The model's noise prediction eps(x_t | t, label)."""
    return model(x_t, t, class_labels=labels).sample


def drop_labels(labels: torch.Tensor, spec: DDPMSpec, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Replace each label by the null class with probability p (training for classifier-free guidance)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, spec.null_label), labels)


def diffusion_loss(model: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The ordinary DDPM objective: mean || eps - eps_theta(x_t | t, label) ||^2 at random t."""
    x_t, t, noise = noised(scheduler, x0, generator)
    return F.mse_loss(eps(model, x_t, t, labels), noise)


# ---- sampling -------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model: UNet2DModel, spec: DDPMSpec, labels: Sequence[int] | torch.Tensor | None = None, *,
           n: int | None = None, steps: int = 25, guidance: float = 2.0, seed: int = 0,
           batch_size: int = 256) -> torch.Tensor:
    """Generate images in [0, 1], one per label (or `n` for an unconditional model), deterministically.

    DDIM with eta = 0: the result depends only on the weights, the labels, `steps`, `guidance` and `seed`
    (every initial noise is drawn up front, so the batch size changes nothing). `guidance` = 1 samples the
    plain conditional model; > 1 uses classifier-free guidance when the model has a null class.
    """
    if spec.conditional:
        if labels is None:
            raise ValueError("a class-conditional model needs labels to sample")
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < spec.classes):
            raise ValueError(f"labels must lie in 0..{spec.classes - 1}")
        count = len(labels)
    else:
        count = int(n if n is not None else len(labels or ()))
        labels = None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((count, spec.in_channels, spec.resolution, spec.resolution), generator=generator)
    guided = spec.conditional and spec.null_class and guidance != 1.0
    model.eval()
    out = []
    for start in range(0, count, batch_size):
        x = noise[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        scheduler = sampling_scheduler(spec, steps)
        for t in scheduler.timesteps:
            tt = torch.full((len(x),), int(t), device=device, dtype=torch.int64)
            if guided:
                assert y is not None  # guidance implies a conditional model, which has labels
                both = eps(model, torch.cat([x, x]), torch.cat([tt, tt]),
                           torch.cat([y, torch.full_like(y, spec.null_label)]))
                cond, uncond = both.chunk(2)
                e = uncond + guidance * (cond - uncond)
            else:
                e = eps(model, x, tt, y)
            # use_clipped_model_output: re-derive eps from the clipped x0 prediction. Without it, DDIM mixes a
            # clipped x0 with the raw eps, which a small guided model turns into scribbles as steps increase.
            x = scheduler.step(e, t, x, use_clipped_model_output=True).prev_sample
        out.append(to_pixels(x).cpu())
    return torch.cat(out) if out else torch.empty(0, spec.in_channels, spec.resolution, spec.resolution)
