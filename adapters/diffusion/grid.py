"""Pictures of what a DDPM generates: a PNG grid an operator can look at (before and after a request).

A class-conditional model gives one row per class (the class number drawn at the left); an unconditional
one gives `n` samples in rows of `per_row`. Sampling is deterministic (fixed seed, DDIM), so a grid of the
same model, classes and seed before and after a request shows exactly what the request changed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from PIL import Image, ImageDraw

from adapters.diffusion import ddpm

GAP = 2  # pixels between tiles (at output scale)
LABEL_WIDTH = 12  # left margin for the class number, pixels at output scale


def sample_grid(model: UNet2DModel, spec: ddpm.DDPMSpec, classes: Sequence[int] | None = None, n: int = 8,
                seed: int = 0, *, steps: int = 25, guidance: float = 2.0, scale: int = 2, per_row: int = 8) -> bytes:
    """PNG bytes of a sample grid. Conditional models: one row per class in `classes` (default: every class),
    `n` samples each. Unconditional models: `n` samples, `per_row` per row. `scale` enlarges each pixel."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if spec.conditional:
        rows = list(range(spec.classes)) if classes is None else [int(c) for c in classes]
        labels = torch.as_tensor(rows, dtype=torch.int64).repeat_interleave(n)
        images = ddpm.sample(model, spec, labels, steps=steps, guidance=guidance, seed=seed)
        tiles = [images[i * n:(i + 1) * n] for i in range(len(rows))]
        names = [str(c) for c in rows]
    else:
        images = ddpm.sample(model, spec, n=n, steps=steps, seed=seed)
        tiles = [images[i:i + per_row] for i in range(0, n, per_row)]
        names = None
    return _png(tiles, names, spec.resolution * scale)


def _png(rows: list[torch.Tensor], names: list[str] | None, tile: int) -> bytes:
    cols = max(len(r) for r in rows)
    left = LABEL_WIDTH if names else 0
    width = left + cols * (tile + GAP) + GAP
    height = len(rows) * (tile + GAP) + GAP
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        top = GAP + i * (tile + GAP)
        if names:
            draw.text((2, top + tile // 2 - 5), names[i], fill=0)
        for j, image in enumerate(row):
            pixels = (image.mean(0) * 255).round().to(torch.uint8).numpy()  # channels -> grey
            tile_img = Image.fromarray(pixels).resize((tile, tile), Image.NEAREST)
            canvas.paste(tile_img, (left + GAP + j * (tile + GAP), top))
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=True)
    return out.getvalue()
