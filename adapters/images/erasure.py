"""`erase` requests as an engine: a stored image and a mask in, the edited image and its receipt out.

The target is an image collection plus the diffusion model that edits it. A request names an image id and a
mask (adapters/images/masks.py); the engine runs the Attentive Eraser and returns an `ErasureChange`, which
saves the edited image (PNG) and a receipt: the hashes of the source file, the result file and the mask, the
mask's size and bounding box, the model and every parameter. The receipt never holds pixels of the original,
nor the mask itself (a silhouette can identify a person); deleting the original is the caller's step, after
the change is durable.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from adapters.base import Change, Engine, Forget, InvalidForget, NothingToForget, register
from adapters.diffusion import ddpm
from adapters.images import masks as masks_mod
from adapters.images.collection import (
    ImageCollection,
    ImageEntry,
    UnknownImage,
    check_id,
    decode_png,
    encode_png,
    sha256,
)
from adapters.images.eraser import EraserConfig, erase, prepare_region

MODEL_KIND = "images"
# Dead-letter reasons of refused image requests (InvalidForget.reason; the daemon's closed set lists them).
UNKNOWN_IMAGE, WRONG_COLLECTION, INVALID_MASK = "unknown_image", "wrong_collection", "invalid_mask"
METHOD = "attentive_eraser"
IMAGE_FILE = "image.png"
RECEIPT_FILE = "receipt.json"
# What the ledger and the result event carry of a receipt (receipt.json in the artifact holds it all).
RECEIPT_SUMMARY = ("image", "source_sha256", "result_sha256", "mask_sha256", "mask_pixels", "mask_box")


@dataclasses.dataclass
class ImagesTarget:
    name: str
    version: str
    collection: ImageCollection
    model: UNet2DModel  # any diffusers UNet with decoder self-attention, in pixel space ([-1, 1])
    spec: ddpm.DDPMSpec  # its noise schedule (the sampler is DDIM on the same betas)
    # Other image collections the caller serves, by owner name: an id found there is named as belonging to
    # another collection rather than unknown (a request sent to the wrong model).
    others: Mapping[str, ImageCollection] = dataclasses.field(default_factory=dict)
    # (image id, mask SHA-256) of every erasure recorded: the same erasure asked again has nothing left to remove
    erased: frozenset[tuple[str, str]] = frozenset()

    def scheduler(self, steps: int) -> Any:
        """The DDIM sampler on the model's training noise schedule."""
        return ddpm.sampling_scheduler(self.spec, steps)


class ErasureChange(Change):
    """An edited image and its receipt (not a weight change: the model is untouched)."""

    kind = "erasure"

    def __init__(self, image_id: str, png: bytes, receipt: dict[str, Any], metrics: dict[str, float]):
        super().__init__(metrics, info={"receipt": {k: receipt[k] for k in RECEIPT_SUMMARY}})
        self.image_id = image_id
        self.png = png
        self.receipt = receipt

    def save(self, directory: Path) -> None:
        (directory / IMAGE_FILE).write_bytes(self.png)
        (directory / RECEIPT_FILE).write_text(json.dumps(self.receipt, indent=2, sort_keys=True))

    @property
    def image(self) -> torch.Tensor:
        return decode_png(self.png)


def request_mask(forget: Forget) -> tuple[str, Mapping[str, Any]]:
    """(image id, mask spec) of an image request; the mask may arrive as an object or as its JSON text. What
    needs no image: the kind of request, the id's form, the mask's presence and JSON (raises InvalidForget)."""
    if forget.kind != "image" or forget.image is None:
        raise InvalidForget(f"image collections serve forget.image + forget.mask requests, not forget.{forget.kind}")
    try:
        image_id = check_id(forget.image)
    except ValueError as e:
        raise InvalidForget(str(e), UNKNOWN_IMAGE) from None
    spec = forget.mask
    if spec is None:
        raise InvalidForget("forget.mask is required with forget.image (a box or a run-length mask)", INVALID_MASK)
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise InvalidForget("forget.mask is not valid JSON", INVALID_MASK) from None
    return image_id, spec


def _bounding_box(mask: torch.Tensor) -> list[int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@register
class AttentiveEraserEngine(Engine):
    name = METHOD
    model_kinds = frozenset({MODEL_KIND})
    Config = EraserConfig

    def _resolve(self, target: ImagesTarget, forget: Forget) -> tuple[ImageEntry, torch.Tensor]:
        image_id, spec = request_mask(forget)
        try:
            entry = target.collection.entry(image_id)
        except UnknownImage:
            owners = sorted(name for name, other in target.others.items() if image_id in other)
            if owners:
                raise InvalidForget(f"image {image_id!r} belongs to the collection of model {owners[0]!r}, not "
                                    f"{target.name!r}: send the request to {owners[0]!r}", WRONG_COLLECTION) from None
            raise InvalidForget(f"no image {image_id!r} in the collection of model {target.name!r}",
                                UNKNOWN_IMAGE) from None
        try:
            mask = masks_mod.parse_mask(spec, entry.shape)
            prepare_region(mask[None], self.config)
        except masks_mod.MaskError as e:
            raise InvalidForget(f"image {image_id!r}: {e}", INVALID_MASK) from None
        channels = target.model.config.in_channels
        if entry.shape[0] != channels:
            raise InvalidForget(f"image {image_id!r} has {entry.shape[0]} channel(s); model {target.name!r} "
                                f"edits {channels}-channel images", INVALID_MASK)
        return entry, mask

    def validate(self, target: ImagesTarget, forget: Forget) -> None:
        self._resolve(target, forget)

    def apply(self, target: ImagesTarget, forget: Forget,
              progress: Callable[[dict[str, Any]], None] | None = None) -> ErasureChange:
        started = time.perf_counter()
        entry, mask = self._resolve(target, forget)
        if (entry.id, masks_mod.mask_sha256(mask)) in target.erased:
            raise NothingToForget(1)  # answered applied and unchanged: regenerating the region again erases nothing
        source = target.collection.load(entry.id)
        result = erase(target.model, source, mask, target.scheduler(self.config.steps), self.config)
        png = encode_png(result)
        region = prepare_region(mask[None], self.config)[0]
        diff = (result.int() - source.int()).abs()
        receipt = {
            "image": entry.id,
            "method": METHOD,
            "model": target.name,
            "model_version": target.version,
            "source_sha256": entry.sha256,
            "result_sha256": sha256(png),
            "mask_sha256": masks_mod.mask_sha256(mask),
            "mask_pixels": int(mask.sum()),
            "mask_box": _bounding_box(mask),
            "edited_pixels_max": int(region.sum()),  # the dilated mask: nothing outside it may change
            "shape": list(entry.shape),
            "parameters": dataclasses.asdict(self.config),
        }
        metrics = {
            "mask_fraction": float(mask.float().mean()),
            "changed_pixels": int((diff > 0).any(dim=0).sum()),
            "outside_mask_max_abs_diff": int(diff[:, ~region].max()) if bool((~region).any()) else 0,
            "mask_mean_abs_change": float(diff[:, mask].float().mean() / 255),
            "seconds": time.perf_counter() - started,
        }
        return ErasureChange(entry.id, png, receipt, metrics)
