"""Pictures for people: a before/after strip of one erasure, and grids of many (the README's figure).

Images are uint8 (C, H, W), grayscale or RGB; panels are enlarged by nearest-neighbour `scale` so small
demo canvases stay readable, and an optional mask is outlined in red on the "before" panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adapters.images.collection import encode_png

OUTLINE = (255, 48, 48)
GAP_COLOUR = 255


def _rgb(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"panels are uint8 (C, H, W) with C = 1 or 3, got {tuple(image.shape)} {image.dtype}")
    return image.expand(3, -1, -1).clone() if image.shape[0] == 1 else image.clone()


def outline(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An RGB copy of `image` with the outer border of `mask` (bool (H, W)) drawn in red."""
    rgb = _rgb(image)
    grown = F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    border = grown & ~mask
    for channel, value in enumerate(OUTLINE):
        rgb[channel][border] = value
    return rgb


def grid_png(rows: Sequence[Sequence[torch.Tensor]], *, scale: int = 4, gap: int = 2) -> bytes:
    """Panels arranged in rows (all the same size), enlarged `scale` times, `gap` pixels apart, as a PNG."""
    if not rows or not rows[0]:
        raise ValueError("nothing to draw")
    height, width = rows[0][0].shape[-2:]
    if any(p.shape[-2:] != (height, width) for row in rows for p in row):
        raise ValueError("all panels must have the same size")
    columns = max(len(row) for row in rows)
    cell_h, cell_w = height * scale, width * scale
    canvas = torch.full((3, len(rows) * (cell_h + gap) - gap, columns * (cell_w + gap) - gap), GAP_COLOUR,
                        dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            big = _rgb(panel).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y, x = r * (cell_h + gap), c * (cell_w + gap)
            canvas[:, y:y + cell_h, x:x + cell_w] = big
    return encode_png(canvas)


def before_after_png(after: torch.Tensor, before: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     *, scale: int = 4) -> bytes:
    """The edited image next to its original (outlined with `mask` when given), or the edited image alone
    when the original no longer exists."""
    if before is None:
        return grid_png([[after]], scale=scale)
    shown = outline(before, mask) if mask is not None else before
    return grid_png([[shown, after]], scale=scale)
