import dataclasses
import io

from PIL import Image

from adapters.diffusion import ddpm, grid

from .conftest import TINY


def _open(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(png))


def test_grid_has_one_row_per_class_and_is_reproducible(tiny_model):
    png = grid.sample_grid(tiny_model, TINY, classes=[3, 7], n=4, seed=1, steps=2, scale=2)
    image = _open(png)
    tile = TINY.resolution * 2
    assert image.size == (grid.LABEL_WIDTH + 4 * (tile + grid.GAP) + grid.GAP, 2 * (tile + grid.GAP) + grid.GAP)
    assert grid.sample_grid(tiny_model, TINY, classes=[3, 7], n=4, seed=1, steps=2, scale=2) == png
    assert grid.sample_grid(tiny_model, TINY, classes=[3, 7], n=4, seed=2, steps=2, scale=2) != png


def test_grid_defaults_to_every_class(tiny_model):
    image = _open(grid.sample_grid(tiny_model, TINY, n=1, steps=1, scale=1))
    assert image.size[1] == 10 * (TINY.resolution + grid.GAP) + grid.GAP


def test_unconditional_grid_wraps_rows():
    spec = dataclasses.replace(TINY, num_classes=None)
    image = _open(grid.sample_grid(ddpm.build(spec), spec, n=5, steps=1, scale=1, per_row=2))
    assert image.size == (2 * (spec.resolution + grid.GAP) + grid.GAP, 3 * (spec.resolution + grid.GAP) + grid.GAP)
