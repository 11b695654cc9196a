"""Stored images: request masks, the collection, the demo canvases, the before/after picture and the
erasure engine's change and receipt (on a tiny random UNet: the parts, not the quality)."""

import json

import pytest
import torch

from adapters.base import Forget, InvalidForget
from adapters.datasets import LabeledSet
from adapters.diffusion import ddpm
from adapters.images import masks, render
from adapters.images.canvas import CanvasMaker, CanvasSpec
from adapters.images.collection import ImageCollection, ObjectBox, UnknownImage, decode_png, sha256
from adapters.images.eraser import EraserConfig
from adapters.images.erasure import AttentiveEraserEngine, ImagesTarget

pytestmark = pytest.mark.usefixtures("one_thread")

# Made with pycocotools 2.0.11: mask.encode(np.asfortranarray(m))["counts"], m as in test_coco_compressed_rle.
COCO_40x50 = ("S13U100000000000000000POh00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00X"
              "O0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h00XO0h0"
              "0XO0h00XO0h00XO0h00XO0h00XO0h00XOP10000000mNNP12PO")


# ---- masks ----------------------------------------------------------------------------------------------------

def test_box_mask_ends_are_exclusive():
    m = masks.parse_mask({"box": [2, 1, 5, 3]}, (1, 6, 8))
    assert m.shape == (6, 8) and int(m.sum()) == 6 and m[1:3, 2:5].all()


@pytest.mark.parametrize("spec, message", [
    ({"box": [3, 3, 3, 5]}, "empty"),
    ({"box": [5, 1, 2, 3]}, "empty"),
    ({"box": [-1, 0, 3, 3]}, "outside"),
    ({"box": [0, 0, 9, 3]}, "outside"),
    ({"box": [0, 0, 8, 6]}, "whole"),
    ({"box": [0, 0, 2]}, "four integers"),
    ({"box": [0, 0, 2.5, 3]}, "four integers"),
    ({"box": [0, 0, True, 3]}, "four integers"),
    ({"box": "0,0,2,3"}, "four integers"),
    ({}, "exactly one"),
    ({"box": [0, 0, 2, 2], "rle": {}}, "exactly one"),
    ({"polygon": [1, 2]}, "exactly one"),
    ([0, 0, 2, 2], "must be an object"),
    ({"rle": {"size": [6, 8]}}, "exactly the keys"),
    ({"rle": {"size": [8, 6], "counts": [48]}}, "does not match"),
    ({"rle": {"size": [6, 8], "counts": [40, 7]}}, "cover 47 pixels"),
    ({"rle": {"size": [6, 8], "counts": [50, -2]}}, "negative"),
    ({"rle": {"size": [6, 8], "counts": [48]}}, "empty"),
    ({"rle": {"size": [6, 8], "counts": [0, 48]}}, "whole"),
    ({"rle": {"size": [6, 8], "counts": "0 !"}}, "invalid character"),
    ({"rle": {"size": [6, 8], "counts": "a"}}, "ends inside"),
    ({"rle": {"size": [6, 8], "counts": [1.5, 46.5]}}, "run lengths"),
])
def test_bad_masks_are_refused_with_a_reason(spec, message):
    with pytest.raises(masks.MaskError, match=message):
        masks.parse_mask(spec, (6, 8))


def test_uncompressed_rle_is_column_major_and_round_trips():
    m = torch.zeros(6, 8, dtype=torch.bool)
    m[1:4, 2:5] = True
    m[5, 7] = True
    counts = masks.rle_counts(m)
    assert counts[:2] == [13, 3]  # column-major: columns 0-1 and row 0 of column 2 (13), then rows 1-3
    assert torch.equal(masks.parse_mask({"rle": {"size": [6, 8], "counts": counts}}, (6, 8)), m)
    starts_inside = torch.zeros(6, 8, dtype=torch.bool)
    starts_inside[0, 0] = True
    assert masks.rle_counts(starts_inside)[0] == 0


def test_coco_compressed_rle():
    m = torch.zeros(40, 50, dtype=torch.bool)
    m[3:30, 10:45] = True
    m[35:38, 0:50] = True
    m[0, 49] = True
    assert torch.equal(masks.parse_mask({"rle": {"size": [40, 50], "counts": COCO_40x50}}, (40, 50)), m)


def test_mask_digest_names_shape_and_pixels():
    a = torch.zeros(4, 6, dtype=torch.bool)
    a[1, 2] = True
    b = a.clone()
    b[1, 3] = True
    assert masks.mask_sha256(a) == masks.mask_sha256(a.clone())
    assert masks.mask_sha256(a) != masks.mask_sha256(b)
    assert masks.mask_sha256(a) != masks.mask_sha256(a.reshape(6, 4))


def test_dilate_and_token_grid():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 3, 3] = True
    assert int(masks.dilate(m, 1).sum()) == 9 and int(masks.dilate(m, 0).sum()) == 1
    grid = masks.on_grid(m, 4, 4).reshape(4, 4)
    assert grid[1, 1] and int(grid.sum()) == 1  # pixel (3, 3) lies in token (1, 1) of a 4x4 grid


# ---- collection -----------------------------------------------------------------------------------------------

def test_collection_stores_loads_hashes_and_removes(tmp_path):
    c = ImageCollection(tmp_path / "c")
    gray = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    entry = c.put("a-1.png_x", gray, (ObjectBox((1, 1, 3, 4), label=7, source_id=12),))
    c.put("b", rgb)
    assert entry.sha256 == sha256(c.path("a-1.png_x").read_bytes()) and entry.shape == (1, 5, 7)
    reopened = ImageCollection(tmp_path / "c")
    assert reopened.ids() == ["a-1.png_x", "b"]
    assert torch.equal(reopened.load("a-1.png_x"), gray) and torch.equal(reopened.load("b"), rgb)
    assert reopened.entry("a-1.png_x").objects == (ObjectBox((1, 1, 3, 4), label=7, source_id=12),)
    reopened.remove("b")
    assert "b" not in ImageCollection(tmp_path / "c") and not c.path("b").exists()
    with pytest.raises(UnknownImage, match="no image 'b'"):
        reopened.load("b")


@pytest.mark.parametrize("bad", ["../x", ".hidden", "", "a/b", "x" * 129, "-rf", "a b", None])
def test_collection_refuses_ids_that_are_not_plain_names(tmp_path, bad):
    c = ImageCollection(tmp_path)
    with pytest.raises(ValueError, match="invalid image id"):
        c.put(bad, torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(KeyError):
        c.entry(bad)


def test_collection_notices_a_file_changed_behind_its_back(tmp_path):
    c = ImageCollection(tmp_path)
    c.put("a", torch.zeros(1, 4, 4, dtype=torch.uint8))
    c.path("a").write_bytes(c.path("a").read_bytes() + b"\0")
    with pytest.raises(OSError, match="sha256"):
        c.load("a")


# ---- demo canvases --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(20, 1, 28, 28)
    for i in range(20):  # crude "digits": a bright bar somewhere in the 20x20 core
        r = int(torch.randint(6, 20, (1,), generator=g))
        x[i, 0, r:r + 3, 8:20] = 1.0
    return LabeledSet(x, torch.arange(20) % 10, torch.arange(100, 120))


def test_canvases_are_deterministic_apart_and_boxed(digit_rows):
    maker = CanvasMaker(digit_rows, CanvasSpec(size=32, gap=2))
    a, b = maker.canvas(5), maker.canvas(5)
    assert torch.equal(a.image, b.image) and a.objects == b.objects
    assert not torch.equal(maker.canvas(6).image, a.image)
    for seed in range(30):
        canvas = maker.canvas(seed)
        assert 2 <= len(canvas.objects) <= 3
        for i, o in enumerate(canvas.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert o.source_id in range(100, 120) and o.label == o.source_id % 10
            without = canvas.render(without=i)
            changed = (without != canvas.image)[0]
            assert changed.any() and not changed[:y0].any() and not changed[y1:].any()
            assert not changed[:, :x0].any() and not changed[:, x1:].any()  # a digit lives inside its box
            for other in canvas.objects[i + 1:]:
                ox0, oy0, ox1, oy1 = other.box
                assert x1 <= ox0 or ox1 <= x0 or y1 <= oy0 or oy1 <= y0


# ---- pictures -------------------------------------------------------------------------------------------------

def test_before_after_png():
    before = torch.full((1, 8, 10), 40, dtype=torch.uint8)
    after = torch.full((1, 8, 10), 90, dtype=torch.uint8)
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[2:5, 3:6] = True
    both = decode_png(render.before_after_png(after, before, mask, scale=2))
    assert both.shape == (3, 16, 2 * 20 + 2)
    assert tuple(both[:, 2, 4].tolist()) == render.OUTLINE  # the mask's outline on "before" (pixel (1, 2) x2)
    assert both[:, :, 22:].eq(90).all()  # "after" untouched
    alone = decode_png(render.before_after_png(after, scale=2))
    assert alone.shape == (3, 16, 20)


# ---- engine ---------------------------------------------------------------------------------------------------

TINY = ddpm.DDPMSpec(resolution=16, channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_groups=4,
                     num_classes=None)


@pytest.fixture
def target(tmp_path):
    torch.manual_seed(0)
    collection = ImageCollection(tmp_path / "photos")
    collection.put("p1", torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8), (ObjectBox((3, 4, 9, 10), 1),))
    collection.put("rgb", torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    return ImagesTarget("tiny-images", "v1", collection, ddpm.build(TINY).eval(), TINY)


def test_engine_erases_and_writes_a_receipt_without_pixels(target, tmp_path):
    engine = AttentiveEraserEngine(EraserConfig(steps=8, suppression_steps=2))
    source = target.collection.load("p1")
    change = engine.apply(target, Forget(image="p1", mask=json.dumps({"box": [3, 4, 9, 10]})))
    out = tmp_path / "artifact"
    out.mkdir()
    change.save(out)
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["source_sha256"] == target.collection.entry("p1").sha256
    assert receipt["result_sha256"] == sha256((out / "image.png").read_bytes())
    mask = masks.parse_mask({"box": [3, 4, 9, 10]}, (16, 16))
    assert receipt["mask_sha256"] == masks.mask_sha256(mask) and receipt["mask_box"] == [3, 4, 9, 10]
    assert receipt["parameters"]["steps"] == 8 and receipt["method"] == "attentive_eraser"
    assert not any(isinstance(v, list) and len(v) > 8 for v in receipt.values())  # hashes and sizes, no pixels
    assert change.metrics["outside_mask_max_abs_diff"] == 0 and change.metrics["changed_pixels"] > 0
    result = decode_png((out / "image.png").read_bytes())
    outside = ~masks.dilate(mask, 1)
    assert torch.equal(result[:, outside], source[:, outside])
    assert torch.equal(target.collection.load("p1"), source)  # the engine never deletes: the caller does


@pytest.mark.parametrize("forget, message, reason", [
    (Forget(image="nope", mask='{"box": [0, 0, 2, 2]}'), "no image 'nope'", "unknown_image"),
    (Forget(image="../p1", mask='{"box": [0, 0, 2, 2]}'), "invalid image id", "unknown_image"),
    (Forget(image="p1"), "forget.mask is required", "invalid_mask"),
    (Forget(image="p1", mask="{box"), "not valid JSON", "invalid_mask"),
    (Forget(image="p1", mask='{"box": [0, 0, 16, 16]}'), "whole", "invalid_mask"),
    (Forget(image="p1", mask='{"box": [0, 0, 15, 15]}'), "grown by 1 px covers the whole image", "invalid_mask"),
    (Forget(image="p1", mask='{"box": [10, 10, 20, 12]}'), "outside", "invalid_mask"),
    (Forget(image="rgb", mask='{"box": [0, 0, 2, 2]}'), "3 channel", "invalid_mask"),
    (Forget(image="theirs", mask='{"box": [0, 0, 2, 2]}'), "belongs to the collection of model 'album'",
     "wrong_collection"),
    (Forget(sample_ids=(1,)), "forget.image", "invalid_forget"),
])
def test_engine_refuses_requests_it_cannot_serve(target, tmp_path, forget, message, reason):
    album = ImageCollection(tmp_path / "album")
    album.put("theirs", torch.zeros(1, 16, 16, dtype=torch.uint8))
    target.others = {"album": album}
    with pytest.raises(InvalidForget, match=message) as refused:
        AttentiveEraserEngine().validate(target, forget)
    assert refused.value.reason == reason  # the dead-letter reason the daemon files it under
