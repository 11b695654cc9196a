"""Image erasure through the daemon: a real broker, a real daemon process, the demo collection recipe with a
tiny UNet (built by the daemon in the background once it consumes, seconds; requests wait for it). An erase
request is applied (edited image and receipt in the store, original deleted, pixels outside the dilated mask
bit-identical); bad masks, unknown ids and images of another collection are dead-lettered with their reasons;
`unlearnd images show` renders the result."""

from __future__ import annotations

import hashlib
import json
import time

import torch

from adapters.images.collection import ImageCollection, decode_png
from adapters.images.masks import dilate, parse_mask, rle_counts
from daemon.dead_letter import HEADER_REASON
from tests.harness import request

MODEL, OTHER = "canvases", "albums"


#: The demo recipe shrunk to seconds: a tiny UNet, a few training steps (the recipe's other values stay).
TINY_RECIPE = ('recipe = "images"\ntrain_canvases = 32\ntrain = { steps = 3, warmup_steps = 0 }\n'
               "ddpm = { channels = [8, 16, 16], attention_head_dim = 8, norm_groups = 8 }\n")


def _add_images_models(stack, tmp_path) -> ImageCollection:
    other = ImageCollection(tmp_path / "albums")  # another images model's own collection
    other.put("photo-1", torch.full((1, 32, 32), 40, dtype=torch.uint8))
    with open(stack.config_path, "a") as fh:
        fh.write(f'\n[models.{MODEL}]\nkind = "images"\n[models.{MODEL}.bootstrap]\ncollection_size = 3\n'
                 f'{TINY_RECIPE}\n[models.{OTHER}]\nkind = "images"\ncollection = "{other.root}"\n'
                 f"[models.{OTHER}.bootstrap]\n{TINY_RECIPE}"
                 "\n[methods.attentive_eraser]\nsteps = 5\nsuppression_steps = 1\n")
    return other


def _erase(request_id: str, image: str, mask: dict) -> dict:
    return {**request(request_id), "model": MODEL, "forget": {"image": image, "mask": mask}}


def test_erase_requests_edit_the_image_delete_the_original_and_refuse_bad_masks(stack, tmp_path):
    _add_images_models(stack, tmp_path)
    proc = stack.start(UNLEARND__REQUESTS__TRANSIENT_BACKOFF_MAX_S="1", OMP_NUM_THREADS="1")
    root = stack.state / "artifacts" / MODEL / "collection"
    deadline = time.monotonic() + 120  # the collection comes first in the background bootstrap (seconds)
    while not (root / "index.json").is_file():
        assert time.monotonic() < deadline and proc.poll() is None, stack.log()
        time.sleep(0.2)
    collection = ImageCollection(root)
    assert collection.ids() == ["canvas-0000", "canvas-0001", "canvas-0002"]
    entry = collection.entry("canvas-0000")
    original = collection.read_bytes("canvas-0000")
    box = list(entry.objects[0].box)
    second = collection.entry("canvas-0001")
    rle_mask = parse_mask({"box": list(second.objects[0].box)}, second.shape)

    sent = [
        _erase("img-ok", "canvas-0000", {"box": box}),
        _erase("img-rle", "canvas-0001", {"rle": {"size": [32, 32], "counts": rle_counts(rle_mask)}}),
        _erase("img-empty", "canvas-0002", {"box": [5, 5, 5, 9]}),
        _erase("img-outside", "canvas-0002", {"box": [20, 0, 40, 10]}),
        _erase("img-whole", "canvas-0002", {"box": [0, 0, 32, 32]}),
        _erase("img-unknown", "canvas-9999", {"box": [0, 0, 4, 4]}),
        _erase("img-other", "photo-1", {"box": [0, 0, 4, 4]}),
    ]
    for body in sent:  # most likely before the DDPM exists: they wait for it (the pipeline pauses), none is lost
        stack.publish(body, key=MODEL)
    results = {r["request_id"]: r for r in stack.results(len(sent), timeout=300)}
    assert "bootstrapping canvases: DDPM step 3/3" in stack.log()  # trained in the background, progress logged

    ok = results["img-ok"]
    assert ok["status"] == "applied", ok
    receipt = ok["receipt"]
    assert receipt["erasure"] == "e0000" and receipt["image"] == "canvas-0000" and receipt["original"] == "deleted"
    assert receipt["source_sha256"] == hashlib.sha256(original).hexdigest() == entry.sha256
    assert receipt["mask_box"] == box
    folder = stack.state / "artifacts" / MODEL / "erasures" / "e0000"
    result_png = (folder / "image.png").read_bytes()
    assert hashlib.sha256(result_png).hexdigest() == receipt["result_sha256"]
    assert json.loads((folder / "receipt.json").read_text())["source_sha256"] == entry.sha256

    # The collection now holds the edited image byte for byte; the original's bytes are nowhere under the state.
    collection = ImageCollection(collection.root)
    assert collection.read_bytes("canvas-0000") == result_png
    assert all(f.read_bytes() != original for f in stack.state.rglob("*.png"))
    before, after = decode_png(original), decode_png(result_png)
    outside = ~dilate(parse_mask({"box": box}, entry.shape), 1)
    assert torch.equal(before[:, outside], after[:, outside])  # bit-identical outside the dilated mask
    assert not torch.equal(before, after)

    assert results["img-rle"]["status"] == "applied" and results["img-rle"]["receipt"]["image"] == "canvas-0001"
    row = stack.ledger().get_artifact(MODEL, ok["receipt"]["erasure"])
    assert row.kind == "erasure" and row.request_id == "img-ok" and row.info["receipt"]["mask_box"] == box

    expected = {"img-empty": ("invalid_mask", "empty"), "img-outside": ("invalid_mask", "outside"),
                "img-whole": ("invalid_mask", "whole"), "img-unknown": ("unknown_image", "no image"),
                "img-other": ("wrong_collection", OTHER)}
    for rid, (reason, words) in expected.items():
        r = results[rid]
        assert r["status"] == "rejected" and r["reason"] == reason and words in r["error"], r
    dead = stack.read("dlq", len(expected), timeout=30)
    assert sorted(dict(d.headers)[HEADER_REASON].decode() for d in dead) == sorted(r for r, _ in expected.values())
    assert collection.read_bytes("canvas-0002") == ImageCollection(collection.root).read_bytes("canvas-0002")

    # The same erasure sent again under a new request id: already done, answered so; the image is not edited again.
    stack.publish(_erase("img-again", "canvas-0000", {"box": box}), key=MODEL)
    [again] = stack.results(1, request_id="img-again", timeout=120)
    assert (again["status"], again["changed"], again["metrics"]) == (
        "applied", False, {"forgotten": 0.0, "already_forgotten": 1.0}), again
    assert stack.ledger().count_artifacts(MODEL, "erasure") == 2  # img-ok's and img-rle's
    assert ImageCollection(collection.root).read_bytes("canvas-0000") == result_png

    out = tmp_path / "before_after.png"
    shown = json.loads(stack.cli("images", "show", "canvas-0000", "--out", str(out), "--json").stdout)
    assert shown["rendered"] == "result (original deleted)" and shown["erasures"][0]["original"] == "deleted"
    assert decode_png(out.read_bytes()).shape[-1] == 32 * 4  # the result alone, at scale 4
