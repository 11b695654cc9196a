"""Attention Activation and Suppression (AAS) as a diffusers attention processor.

The eraser runs the UNet on a doubled batch: the first half is the plain branch ("wo"), the second the AAS
branch ("w"). Any diffusers UNet with self-attention works (UNet2DModel's attention blocks,
UNet2DConditionModel's transformer blocks). The redirected layers are found by walking the UNet:

- `layers="decoder"` (the default): the self-attention of its `up_blocks`, the paper's choice on Stable Diffusion;
- `layers="all"`: also the encoder's and the middle block's. A small pixel DDPM decides what fills the hole in
  its encoder, so redirecting its decoder alone leaves the object's shape free to come back.

In each redirected layer the processor leaves the plain half as it is and, in the AAS half:

- adds -inf to the logits of every key inside the object mask (the mask max-pooled to the layer's token
  grid), so no query attends to the object and its attention mass moves to the background;
- while `Redirection.suppress` is set (the first denoising steps), gives queries *inside* the mask the
  flattened logits ``similarity_scale * q.k / sqrt(d)`` (plus the same key mask): flatter attention, less
  copying of object-like patches. Background queries keep ``q.k / sqrt(d)``.

Cross-attention is never changed. A layer whose whole token grid lies inside a sample's mask has no
background to redirect to; that sample runs plain attention there.
Reference: Anonym0u3/AttentiveEraser, `AAS/AAS.py` (an einsum re-implementation hooked into every attention
module); here the key mask is an additive bias to `scaled_dot_product_attention`, as ALGORITHMS.md suggests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from adapters.images import masks as masks_mod


class Redirection:
    """What the AAS processors read while the eraser runs: the object masks of the AAS half of the batch
    (B, H, W) at the model's input resolution, and whether in-mask queries are flattened at this step."""

    def __init__(self, mask: torch.Tensor, similarity_scale: float = 0.3, with_plain: bool = True):
        if mask.ndim != 3 or mask.dtype != torch.bool:
            raise ValueError(f"Redirection needs a bool mask (B, H, W), got {tuple(mask.shape)} {mask.dtype}")
        self.mask = mask
        self.similarity_scale = float(similarity_scale)
        self.suppress = False
        # False: the batch is the AAS branch alone (SARG at guidance 1 needs no plain prediction)
        self.with_plain = with_plain
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return len(self.mask)

    def tokens(self, height: int, width: int) -> torch.Tensor:
        """(B, height * width) bool: which tokens of a layer's grid lie inside each sample's mask."""
        key = (height, width)
        if key not in self._grids:
            self._grids[key] = masks_mod.on_grid(self.mask, height, width)
        return self._grids[key]

    def grid_of(self, tokens: int) -> tuple[int, int]:
        """The (height, width) of a layer with `tokens` tokens (a sequence input carries no grid): the input
        resolution divided by the power of two that gives that many tokens (UNets round sizes up)."""
        height, width = self.mask.shape[-2:]
        factor = 1
        while factor <= max(height, width):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == tokens:
                return h, w
            factor *= 2
        raise ValueError(f"cannot place {tokens} attention tokens on a grid of the {height}x{width} input")


class AASProcessor:
    """The AAS branch's decoder self-attention (see the module docstring); a drop-in for AttnProcessor2_0."""

    def __init__(self, redirection: Redirection):
        self.redirection = redirection

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("AAS applies to self-attention without an attention mask; this layer got "
                             f"{'encoder states' if encoder_hidden_states is not None else 'an attention mask'}")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        else:
            height, width = self.redirection.grid_of(hidden_states.shape[1])
        batch, tokens, _ = hidden_states.shape
        branches = 2 if self.redirection.with_plain else 1
        if batch != branches * self.redirection.batch:
            raise ValueError(f"AAS expects a batch of {branches * self.redirection.batch} "
                             f"({'plain + AAS' if branches == 2 else 'AAS only'}), got {batch}")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self.attend(query, key, value, attn.scale, self.redirection.tokens(height, width))
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               inside: torch.Tensor) -> torch.Tensor:
        """Attention of a doubled batch (2B, heads, N, d): plain for the first half, AAS for the second (or of
        the AAS branch alone, (B, heads, N, d), without `with_plain`). `inside` (B, N) marks the tokens inside
        each sample's mask."""
        if self.redirection.with_plain:
            (q_wo, q_w), (k_wo, k_w), (v_wo, v_w) = query.chunk(2), key.chunk(2), value.chunk(2)
            plain = [F.scaled_dot_product_attention(q_wo, k_wo, v_wo, scale=scale)]
        else:
            q_w, k_w, v_w, plain = query, key, value, []
        redirectable = ~inside.all(dim=1, keepdim=True)  # a sample with no background token here runs plain
        blocked = inside & redirectable
        bias = torch.zeros(blocked.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(blocked.to(query.device), float("-inf"))[:, None, None, :]  # (B, 1, 1, N): keys
        redirected = F.scaled_dot_product_attention(q_w, k_w, v_w, attn_mask=bias, scale=scale)
        if self.redirection.suppress:
            flattened = F.scaled_dot_product_attention(q_w, k_w, v_w, attn_mask=bias,
                                                       scale=self.redirection.similarity_scale * scale)
            queries = blocked.to(query.device)[:, None, :, None]  # (B, 1, N, 1): queries inside the mask
            redirected = torch.where(queries, flattened, redirected)
        return torch.cat([*plain, redirected])


LAYERS = ("decoder", "all")  # which self-attention layers AAS redirects (EraserConfig.layers)


def self_attention_layers(unet: nn.Module, layers: str = "decoder") -> list[tuple[str, Attention]]:
    """The self-attention layers of a diffusers UNet that AAS redirects, in module order: those of its decoder
    (`up_blocks`; the paper's choice for Stable Diffusion) for "decoder", those of the encoder, middle block
    and decoder for "all". Cross-attention is never among them."""
    if layers not in LAYERS:
        raise ValueError(f"layers: must be one of {', '.join(LAYERS)}, not {layers!r}")
    if layers == "decoder":
        root = getattr(unet, "up_blocks", None)
        if root is None:
            raise ValueError(f"{type(unet).__name__} has no decoder (up_blocks); the eraser needs a diffusers UNet")
        prefix = "up_blocks."
    else:
        root, prefix = unet, ""
    found = [(f"{prefix}{name}", module) for name, module in root.named_modules()
             if isinstance(module, Attention) and not module.is_cross_attention]
    if not found:
        where = "its decoder" if layers == "decoder" else "any block"
        raise ValueError(f"{type(unet).__name__} has no self-attention in {where}: the Attentive Eraser "
                         "redirects self-attention (use a UNet with attention blocks)")
    return found


@contextlib.contextmanager
def redirected(unet: nn.Module, redirection: Redirection, layers: str = "decoder") -> Iterator[list[str]]:
    """Install the AAS processor on the UNet's self-attention `layers` (see `self_attention_layers`) for the
    duration of the block (the layers' own processors come back afterwards, also on error); yields the names
    of the layers changed."""
    found = self_attention_layers(unet, layers)
    saved = [(module, module.processor) for _, module in found]
    processor = AASProcessor(redirection)
    try:
        for _, module in found:
            module.set_processor(processor)
        yield [name for name, _ in found]
    finally:
        for module, original in saved:
            module.set_processor(original)
