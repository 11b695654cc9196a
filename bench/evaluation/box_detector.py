"""An independent judge of "is there a digit in this box?" for the eraser benchmark.

A small CNN with 11 classes, the ten digits and "no digit", reads one object box of a canvas (a square crop
around the box with a one-pixel margin, resized to 16x16). It is trained for evaluation only, on
crops of canvases drawn from the registered *training* rows with seeds no other part uses:

- digit crops: every object's box (edges jittered by up to a pixel), labelled with its digit;
- "no digit" crops: (a) the same boxes on the same canvases rendered without that object (what is really
  behind a digit: the background); (b) those backgrounds with clutter that is not a digit: smooth blobs,
  smudges and noise of random strength, so a stain or a ghost-free blur is not mistaken for a digit.

It never sees the benchmark's held-out canvases (drawn from the registered test rows) nor any eraser output.
Its accuracy on the held-out canvases (digit boxes before erasure, and the true backgrounds behind them) is
reported next to every rate it produces.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from adapters.datasets import LabeledSet
from adapters.images.canvas import Canvas, CanvasMaker, CanvasSpec

NONE = 10  # the "no digit" class
CROP = 16
MARGIN = 1
TRAIN_SEED = 5_000_000


@dataclasses.dataclass(frozen=True)
class DetectorRecipe:
    canvases: int = 3000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def square_crop(image: torch.Tensor, box, margin: int = MARGIN, size: int = CROP) -> torch.Tensor:
    """A square around box [x0, y0, x1, y1) (side = its longer edge + 2 * margin, edges replicated past the
    image border) of a uint8 image (C, H, W), resized to size x size, in [0, 1]."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 2 * margin
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    h, w = image.shape[-2:]
    pad = max(0, -left, -top, left + side - w, top + side - h)
    padded = F.pad(image[None].float() / 255, (pad, pad, pad, pad), mode="replicate")
    crop = padded[:, :, top + pad:top + pad + side, left + pad:left + pad + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class BoxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, NONE + 1))

    def forward(self, x):
        return self.net(x)


def _clutter(background: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A background with non-digit clutter: 1-3 Gaussian blobs and/or pixel noise, random strengths."""
    h, w = background.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    out = background.clone()
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
        sigma = 0.8 + 3.0 * float(torch.rand(1, generator=g))
        amp = 0.8 * float(torch.rand(1, generator=g))
        out = out + amp * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))
    if float(torch.rand(1, generator=g)) < 0.5:
        out = out + 0.15 * float(torch.rand(1, generator=g)) * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


def _jitter(box, g: torch.Generator, size: int):
    d = torch.randint(-1, 2, (4,), generator=g).tolist()
    x0, y0, x1, y1 = box[0] + d[0], box[1] + d[1], box[2] + d[2], box[3] + d[3]
    x0, y0 = max(0, min(x0, size - 1)), max(0, min(y0, size - 1))
    return x0, y0, max(x0 + 1, min(x1, size)), max(y0 + 1, min(y1, size))


def training_crops(rows: LabeledSet, canvas: CanvasSpec, recipe: DetectorRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    maker = CanvasMaker(rows, canvas)
    g = torch.Generator().manual_seed(recipe.seed)
    crops, labels = [], []
    for i in range(recipe.canvases):
        c: Canvas = maker.canvas(TRAIN_SEED + i)
        image = c.image
        for k, obj in enumerate(c.objects):
            crops.append(square_crop(image, _jitter(obj.box, g, canvas.size)))
            labels.append(obj.label)
            behind = c.render(without=k)
            crops.append(square_crop(behind, _jitter(obj.box, g, canvas.size)))
            labels.append(NONE)
            cluttered = (_clutter(c.background, g) * 255).round().to(torch.uint8)
            crops.append(square_crop(cluttered, _jitter(obj.box, g, canvas.size)))
            labels.append(NONE)
    return torch.stack(crops), torch.tensor(labels)


def train(rows: LabeledSet, canvas: CanvasSpec, recipe: DetectorRecipe = DetectorRecipe()) -> BoxNet:
    x, y = training_crops(rows, canvas, recipe)
    torch.manual_seed(recipe.seed)
    model = BoxNet()
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    steps = recipe.epochs * ((len(x) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def read_boxes(model: BoxNet, images: torch.Tensor, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, P(some digit)) for each (image (C, H, W) uint8, box) pair; class NONE = no digit."""
    if not len(boxes):
        return torch.empty(0, dtype=torch.int64), torch.empty(0)
    crops = torch.stack([square_crop(img, box) for img, box in zip(images, boxes, strict=True)])
    probs = model(crops).softmax(-1)
    return probs.argmax(-1), 1 - probs[:, NONE]
