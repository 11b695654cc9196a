"""Object masks: parsing a request's mask, dilating it, and bringing it to an attention layer's token grid.

A request names the region to erase in one of two forms (pixel coordinates of the stored image):

- ``{"box": [x0, y0, x1, y1]}``: the pixels x0 <= x < x1, y0 <= y < y1 (ends exclusive, like array slices);
- ``{"rle": {"size": [h, w], "counts": ...}}``: COCO's run-length encoding, which segmenters such as SAM and
  pycocotools emit: runs alternate background/object starting with background, in column-major order;
  `counts` is the list of run lengths (uncompressed RLE) or COCO's compact string (compressed RLE).

A mask that is empty, reaches outside the image or covers all of it is refused with a `MaskError` naming
what is wrong: an eraser needs an object to remove and background to fill it from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_RLE_COUNTS = 1 << 22  # runs in one RLE mask (a 2048x2048 checkerboard); bounds hostile input


class MaskError(ValueError):
    """A request's mask cannot be used on its image."""


def parse_mask(spec: Mapping, image_shape: Sequence[int]) -> torch.Tensor:
    """A request's mask as a bool tensor (H, W) for an image of `image_shape` (H, W) or (C, H, W)."""
    height, width = (int(v) for v in image_shape[-2:])
    if not isinstance(spec, Mapping):
        raise MaskError(f"mask must be an object such as {{\"box\": [x0, y0, x1, y1]}}, got {type(spec).__name__}")
    forms = sorted(set(spec) & {"box", "rle"})
    if len(forms) != 1 or len(spec) != 1:
        raise MaskError(f"mask must have exactly one of the keys 'box' or 'rle', got {sorted(map(str, spec))[:8]}")
    if forms[0] == "box":
        mask = _box_mask(spec["box"], height, width)
    else:
        mask = _rle_mask(spec["rle"], height, width)
    covered = int(mask.sum())
    if covered == 0:
        raise MaskError("mask is empty: it selects no pixel")
    if covered == height * width:
        raise MaskError(f"mask covers the whole {width}x{height} image: there is no background to fill it from")
    return mask


def _box_mask(box, height: int, width: int) -> torch.Tensor:
    if (not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)):
        raise MaskError(f"mask.box must be four integers [x0, y0, x1, y1], got {str(box)[:80]}")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise MaskError(f"mask.box {list(box)} is empty: it needs x0 < x1 and y0 < y1 (ends are exclusive)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise MaskError(f"mask.box {list(box)} reaches outside the {width}x{height} image "
                        f"(x in 0..{width}, y in 0..{height}, ends exclusive)")
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _rle_mask(rle, height: int, width: int) -> torch.Tensor:
    if not isinstance(rle, Mapping) or set(rle) != {"size", "counts"}:
        raise MaskError("mask.rle must be an object with exactly the keys 'size' and 'counts'")
    size = rle["size"]
    if (not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise MaskError(f"mask.rle.size must be [height, width], got {str(size)[:80]}")
    if list(size) != [height, width]:
        raise MaskError(f"mask.rle.size {list(size)} does not match the image's [height, width] {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _counts_from_string(counts)
    elif not isinstance(counts, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        raise MaskError("mask.rle.counts must be a list of run lengths or a COCO RLE string")
    if len(counts) > MAX_RLE_COUNTS:
        raise MaskError(f"mask.rle.counts has {len(counts)} runs, more than {MAX_RLE_COUNTS}")
    if any(v < 0 for v in counts):
        raise MaskError("mask.rle.counts has a negative run length")
    if sum(counts) != height * width:
        raise MaskError(f"mask.rle.counts cover {sum(counts)} pixels, the image has {height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate background, object, ...
    flat = np.repeat(values, counts)
    return torch.from_numpy(flat.reshape(width, height).T.copy())  # column-major, as COCO


def _counts_from_string(text: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString): 6-bit groups, offset by 48,
    5 payload bits each, sign-extended; runs after the second are stored as differences to two runs before."""
    if len(text) > 8 * MAX_RLE_COUNTS:
        raise MaskError("mask.rle.counts string is too long")
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                raise MaskError("mask.rle.counts string ends inside a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"mask.rle.counts string has an invalid character {text[p]!r}")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            p += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
            if shift > 7:
                raise MaskError("mask.rle.counts string has a number too large")
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts(mask: torch.Tensor) -> list[int]:
    """A bool mask (H, W) as COCO uncompressed RLE run lengths (column-major, starting with background)."""
    flat = mask.T.reshape(-1).numpy().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def mask_sha256(mask: torch.Tensor) -> str:
    """A digest of a bool mask (H, W) that names its shape and every pixel (row-major bits)."""
    h, w = mask.shape
    bits = np.packbits(mask.numpy().astype(np.uint8).reshape(-1))
    return hashlib.sha256(f"{h}x{w}:".encode() + bits.tobytes()).hexdigest()


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a bool mask (..., H, W) by `pixels` in every direction (a square structuring element)."""
    if pixels <= 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    return (F.max_pool2d(flat, 2 * pixels + 1, stride=1, padding=pixels) > 0).reshape(shape)


def on_grid(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A bool mask (B, H, W) on a coarser token grid (B, height * width): a token is inside when any pixel
    of its patch is (max pooling, as the reference code downsamples the mask)."""
    pooled = F.adaptive_max_pool2d(mask[:, None].float(), (height, width))
    return pooled.reshape(len(mask), height * width) > 0
