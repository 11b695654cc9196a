"""The demo collection's pictures: canvases holding 2-3 real MNIST digits at random, non-overlapping places.

A canvas is a background (a bilinear gradient between four random corner intensities under a faint stripe
texture of random period, angle and phase: a self-similar surface, as walls, grass or sky are in photos, so
"fill the hole with background" has a right answer that is more than a flat tone) with digits drawn over it
as white ink (``pixel = bg + (1 - bg) * ink``). Each digit is the 20x20 core of an MNIST row,
resized to a random size and placed so that no two digits' squares come closer than `gap` pixels; its object
box is the tight box of its ink. Everything is fixed by the seed, and every canvas keeps its layers, so the
benchmark can render the ground truth of an erasure: the same canvas without one digit.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from adapters.datasets import LabeledSet
from adapters.images.collection import ObjectBox

MNIST_CORE = slice(4, 24)  # MNIST centres each digit's 20x20 box in the 28x28 frame
INK_THRESHOLD = 0.05  # ink at or below this is not part of a digit's box


@dataclasses.dataclass(frozen=True)
class CanvasSpec:
    size: int = 32
    digit_sizes: tuple[int, int] = (10, 14)  # a digit's core is resized to a size in this range (inclusive)
    digits: tuple[int, int] = (2, 3)  # digits per canvas, inclusive range
    gap: int = 2  # minimum distance in pixels between two digits' squares
    background: float = 0.3  # corner intensities of the background are drawn from [0, background]
    stripes: float = 0.2  # peak-to-peak contrast of the stripe texture is drawn from [0, stripes]
    stripe_period: tuple[float, float] = (4.0, 8.0)  # in pixels
    max_tries: int = 500  # random layouts tried before a canvas settles for fewer digits


@dataclasses.dataclass
class Canvas:
    background: torch.Tensor  # float (1, H, W) in [0, 1]: the canvas without any digit
    inks: list[torch.Tensor]  # float (1, H, W) per digit: its ink (0 outside its square)
    objects: tuple[ObjectBox, ...]

    def render(self, without: int | None = None) -> torch.Tensor:
        """The canvas as uint8 (1, H, W); `without` leaves one digit out (the ground truth of erasing it)."""
        ink = torch.zeros_like(self.background)
        for i, layer in enumerate(self.inks):
            if i != without:
                ink = torch.maximum(ink, layer)
        return quantize(self.background + (1 - self.background) * ink)

    @property
    def image(self) -> torch.Tensor:
        return self.render()


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounding to nearest."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def background(spec: CanvasSpec, g: torch.Generator) -> torch.Tensor:
    """A gradient between four random corner intensities plus a stripe texture, (1, size, size) in [0, 1]."""
    corners = torch.rand((1, 1, 2, 2), generator=g) * spec.background
    base = F.interpolate(corners, size=(spec.size, spec.size), mode="bilinear", align_corners=True)[0]
    contrast, angle, phase, u = torch.rand(4, generator=g).tolist()
    lo, hi = spec.stripe_period
    period = lo + (hi - lo) * u
    ys, xs = torch.meshgrid(torch.arange(spec.size, dtype=torch.float32),
                            torch.arange(spec.size, dtype=torch.float32), indexing="ij")
    along = xs * math.cos(math.pi * angle) + ys * math.sin(math.pi * angle)
    stripes = 0.5 * (1 + torch.sin(2 * math.pi * (along / period + phase)))
    return (base + contrast * spec.stripes * stripes).clamp(0, 1)


def digit_patches(rows: LabeledSet, size: int) -> torch.Tensor:
    """Every row's 20x20 core resized to size x size, in [0, 1] (N, 1, size, size); the faint resampling
    halo at or below INK_THRESHOLD is cleared, so a digit's pixels all lie inside its ink box."""
    core = rows.x.reshape(len(rows), 1, 28, 28)[:, :, MNIST_CORE, MNIST_CORE]
    patches = F.interpolate(core, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.where(patches > INK_THRESHOLD, patches.clamp(0, 1), torch.zeros(()))


def ink_box(patch: torch.Tensor, x: int, y: int) -> tuple[int, int, int, int] | None:
    """The tight box [x0, y0, x1, y1) of a patch's ink placed at (x, y), or None when it has none."""
    rows = (patch[0] > INK_THRESHOLD).any(dim=1).nonzero().flatten()
    cols = (patch[0] > INK_THRESHOLD).any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1


class CanvasMaker:
    """Draws canvases from a fixed set of digit rows (e.g. the registered training rows, or held-out ones)."""

    def __init__(self, rows: LabeledSet, spec: CanvasSpec = CanvasSpec()):
        if len(rows) == 0:
            raise ValueError("no digit rows to draw canvases from")
        lo, hi = spec.digit_sizes
        if not 0 < lo <= hi <= spec.size:
            raise ValueError(f"digit_sizes {spec.digit_sizes} must lie in 1..{spec.size}")
        self.rows, self.spec = rows, spec
        self._patches = {s: digit_patches(rows, s) for s in range(lo, hi + 1)}

    def canvas(self, seed: int) -> Canvas:
        """Canvas number `seed`: the same seed always gives the same canvas."""
        spec = self.spec
        g = torch.Generator().manual_seed(seed)
        bg = background(spec, g)
        wanted = int(torch.randint(spec.digits[0], spec.digits[1] + 1, (1,), generator=g))
        rows = torch.randint(len(self.rows), (wanted,), generator=g).tolist()
        sizes = torch.randint(spec.digit_sizes[0], spec.digit_sizes[1] + 1, (wanted,), generator=g).tolist()
        places = self._layout(sizes, g)
        inks, objects = [], []
        for row, size, place in zip(rows, sizes, places, strict=False):  # a crowded layout places fewer
            patch = self._patches[size][row]
            box = ink_box(patch, *place)
            if box is None:  # a blank row: nothing to draw
                continue
            layer = torch.zeros_like(bg)
            x, y = place
            layer[:, y:y + size, x:x + size] = patch
            inks.append(layer)
            objects.append(ObjectBox(box=box, label=int(self.rows.y[row]), source_id=int(self.rows.ids[row])))
        return Canvas(bg, inks, tuple(objects))

    def images(self, n: int, seed: int) -> torch.Tensor:
        """n canvases (uint8, (n, 1, H, W)) drawn from seeds seed, seed + 1, ..."""
        return torch.stack([self.canvas(seed + i).image for i in range(n)]) if n else \
            torch.empty(0, 1, self.spec.size, self.spec.size, dtype=torch.uint8)

    def _layout(self, sizes: list[int], g: torch.Generator) -> list[tuple[int, int]]:
        """Top-left corners for squares of `sizes`, at least `gap` apart: the first of `max_tries` random
        layouts that places them all, else the fullest one tried (never fewer than the minimum count if any
        layout reached it)."""
        best: list[tuple[int, int]] = []
        for _ in range(self.spec.max_tries):
            corners = torch.rand((len(sizes), 2), generator=g).tolist()  # uniform over each square's room
            placed: list[tuple[int, int, int]] = []
            for (u, v), size in zip(corners, sizes, strict=True):
                room = self.spec.size - size + 1
                x, y = int(u * room), int(v * room)
                if all(_apart((x, y, size), other, self.spec.gap) for other in placed):
                    placed.append((x, y, size))
                else:
                    break
            if len(placed) > len(best):
                best = [(x, y) for x, y, _ in placed]
            if len(best) == len(sizes):
                break
        return best


def _apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay
