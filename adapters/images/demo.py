"""The demo image collection and the diffusion model its erasures run on, built from registered MNIST rows.

- Collection: `collection_size` canvases (adapters/images/canvas.py) drawn from the registered training rows,
  stored under ids ``canvas-0000``, ... with their object boxes and digit labels.
- Model: an unconditional pixel-space DDPM (diffusers' UNet2DModel through the shared core in
  adapters/diffusion) with self-attention at 16x16 and 8x8 in the encoder, the middle block and the decoder,
  so AAS has 256 and 64 tokens to redirect. It is served with AAS in all of them (ERASER below): this
  small model decides what fills a hole in its encoder, so redirecting its decoder alone, the paper's choice
  for Stable Diffusion, left the digit free to come back (bench/eraser.py's notes in the README).
  Trained by the shared loop (progress callback, stop event, EMA) on canvases drawn from the same rows with
  other seeds; sized for well under 15 minutes on 2 CPU cores (bench/results/eraser.json gives the measured time).

Seeds of the canvases: training draws from TRAINING_SEED, the collection from COLLECTION_SEED; held-out
evaluation canvases (bench/eraser.py) come from the registered *test* rows, which neither ever sees.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from adapters.datasets import LabeledSet
from adapters.diffusion import ddpm, training
from adapters.images.canvas import CanvasMaker, CanvasSpec
from adapters.images.collection import ImageCollection
from adapters.images.eraser import EraserConfig

TRAINING_SEED = 0
COLLECTION_SEED = 1_000_000
ID_FORMAT = "canvas-{:04d}"

CANVAS = CanvasSpec(size=32, digit_sizes=(10, 14), digits=(2, 3), gap=2, background=0.3)

SPEC = ddpm.DDPMSpec(resolution=32, in_channels=1, channels=(16, 32, 64), layers_per_block=1,
                     attention_levels=(1, 2), attention_head_dim=16,
                     norm_groups=8, num_classes=None, null_class=False, init_seed=0)


# The eraser settings the demo model is served with. ALGORITHMS.md's defaults (EraserConfig()) are the paper's,
# for Stable Diffusion. On this small DDPM, tuning canvases (bench/eraser.py's notes in the README) showed that
# SARG's amplification (guidance > 1) and a start at strength 0.8 put digits back into the hole, and that AAS
# takes the digit out only when it also redirects the encoder's self-attention, with in-mask queries flattened
# (factor 0.1) for all but the last steps, which then sharpen the background. So the demo runs the AAS branch
# alone (guidance 1) from pure noise inside the mask (strength 1), in every self-attention layer.
ERASER = EraserConfig(strength=1.0, guidance=1.0, layers="all", suppression_steps=45, similarity_scale=0.1)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that fixes the demo model's weights (its hash names the cached weights)."""

    spec: ddpm.DDPMSpec = SPEC
    canvas: CanvasSpec = CANVAS
    canvases: int = 8000  # distinct training canvases
    # Digits per training canvas. The collection's canvases hold 2-3, but a model that has only seen crowded
    # canvases has learnt that a digit-sized hole holds a digit; empty and sparse scenes teach it that a hole
    # can be background, as photos teach a large model.
    training_digits: tuple[int, int] = (0, 3)
    train: training.TrainConfig = dataclasses.field(default_factory=lambda: training.TrainConfig(
        steps=2500, batch_size=32, lr=2e-3, warmup_steps=100, label_dropout=0.0, ema_decay=0.999, seed=0))
    collection_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_images(rows: LabeledSet, recipe: Recipe) -> torch.Tensor:
    """The recipe's training canvases in model space ([-1, 1])."""
    scenes = dataclasses.replace(recipe.canvas, digits=recipe.training_digits)
    pixels = CanvasMaker(rows, scenes).images(recipe.canvases, TRAINING_SEED)
    return ddpm.to_model_space(pixels.float() / 255, recipe.spec)


def train_model(rows: LabeledSet, recipe: Recipe = Recipe(), *, on_step: training.ProgressFn | None = None,
                stop: threading.Event | None = None, device: torch.device | str = "cpu") -> UNet2DModel:
    """Train the demo DDPM from scratch on canvases of `rows` (the registered training rows), on `device`.
    Raises training.TrainingStopped when `stop` is set before it finishes."""
    if recipe.spec.conditional:
        raise ValueError("the eraser's demo model is unconditional (num_classes = None)")
    if recipe.spec.resolution != recipe.canvas.size:
        raise ValueError(f"model resolution {recipe.spec.resolution} != canvas size {recipe.canvas.size}")
    images = training_images(rows, recipe)
    model = ddpm.build(recipe.spec).to(device)  # initialised on the CPU: the same first weights on any device
    return training.train(model, recipe.spec, images, None, recipe.train, on_step=on_step, stop=stop)


def build_collection(root: str | Path, rows: LabeledSet, recipe: Recipe = Recipe()) -> ImageCollection:
    """The demo collection: `recipe.collection_size` canvases of `rows`, ids canvas-0000, ..."""
    collection = ImageCollection(root)
    maker = CanvasMaker(rows, recipe.canvas)
    for i in range(recipe.collection_size):
        canvas = maker.canvas(COLLECTION_SEED + i)
        collection.put(ID_FORMAT.format(i), canvas.image, canvas.objects)
    return collection
