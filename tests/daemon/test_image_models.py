"""What a recorded erasure does to an images model's collection (daemon/image_models.py), without a daemon:
the swap is idempotent (a crash between the ledger and the swap only delays it), a retained original gives
`images show` its before/after until the retention runs out, then the result alone."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from adapters.images.collection import ImageCollection, ObjectBox, decode_png, encode_png, sha256
from adapters.store import ArtifactStore
from daemon import config as config_mod
from daemon import image_models
from daemon.cli import app
from daemon.ledger import Ledger
from daemon.models import ModelRegistry

MODEL = "album"


def _setup(tmp_path, retain_s: float):
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(f'[state]\ndir = "var"\n[models.{MODEL}]\nkind = "images"\ncollection = "photos"\n'
                        f"retain_originals_s = {retain_s}\n")
    cfg = config_mod.load(cfg_path, env={})
    collection = ImageCollection(tmp_path / "photos")
    source = torch.full((1, 16, 16), 30, dtype=torch.uint8)
    source[0, 4:8, 4:8] = 250
    collection.put("p1", source, (ObjectBox((4, 4, 8, 8), label=1), ObjectBox((10, 10, 14, 14), label=2)))
    store, ledger = ArtifactStore(cfg.state.artifacts_path), Ledger(cfg.state.ledger_path)
    result = source.clone()
    result[0, 3:9, 3:9] = 31
    png = encode_png(result)
    receipt = {"image": "p1", "source_sha256": collection.entry("p1").sha256, "result_sha256": sha256(png),
               "mask_sha256": "0" * 64, "mask_pixels": 16, "mask_box": [4, 4, 8, 8]}

    def save(directory):
        (directory / "image.png").write_bytes(png)
        (directory / "receipt.json").write_text(json.dumps(receipt))

    art = store.publish(MODEL, image_models.ERASURES, "e0000", save, {"receipt": receipt})
    ledger.add_artifact(MODEL, "e0000", "erasure", parent=None, request_id="r1", path=str(art.path),
                        sha256=art.sha256, info={"receipt": receipt})
    return cfg, cfg_path, store, ledger, collection, source, png


def _show(cfg_path, out):
    run = CliRunner().invoke(app, ["images", "show", "p1", "--out", str(out), "--json", "--config", str(cfg_path)])
    assert run.exit_code == 0, run.output
    return json.loads(run.output)


def test_retained_original_shows_before_after_until_purged(tmp_path):
    cfg, cfg_path, store, ledger, collection, source, png = _setup(tmp_path, retain_s=3600)
    spec = cfg.models[MODEL]
    assert _show(cfg_path, tmp_path / "a.png")["erasures"][0]["original"] == "pending deletion"

    assert image_models.apply_erasures(store, ledger, MODEL, spec, collection) == 1
    assert image_models.apply_erasures(store, ledger, MODEL, spec, collection) == 0  # idempotent
    assert ImageCollection(collection.root).read_bytes("p1") == png
    assert [o.label for o in ImageCollection(collection.root).entry("p1").objects] == [2]  # erased box gone

    shown = _show(cfg_path, tmp_path / "b.png")
    assert shown["rendered"] == "before/after" and shown["erasures"][0]["original"] == "retained"
    assert decode_png((tmp_path / "b.png").read_bytes()).shape[-1] > 2 * 16 * 4  # two panels

    assert image_models.purge_originals(store, MODEL, 0) == 1  # retention over
    shown = _show(cfg_path, tmp_path / "c.png")
    assert shown["rendered"] == "result (original deleted)" and shown["erasures"][0]["original"] == "deleted"
    assert not any(f.read_bytes() == encode_png(source) for f in tmp_path.rglob("*.png"))


def test_without_retention_the_original_is_deleted_at_once(tmp_path):
    cfg, cfg_path, store, ledger, collection, source, png = _setup(tmp_path, retain_s=0)
    image_models.apply_erasures(store, ledger, MODEL, cfg.models[MODEL], collection)
    assert not image_models.originals_root(store, MODEL).exists() or \
        not any(image_models.originals_root(store, MODEL).iterdir())
    assert not any(f.read_bytes() == encode_png(source) for f in tmp_path.rglob("*.png"))
    assert _show(cfg_path, tmp_path / "d.png")["rendered"] == "result (original deleted)"


def test_sync_sweeps_when_the_ledger_or_the_collection_changes_and_purges_every_time(tmp_path):
    """`sync_collection` runs before every request: it reads the erasure rows only when their number or the
    collection changed since its last sweep, yet an original restored from a backup is erased again, and a
    retained original is purged once its window ends, without a new erasure."""
    cfg, cfg_path, store, ledger, collection, source, png = _setup(tmp_path, retain_s=3600)
    kind = ModelRegistry(cfg, store, ledger).kind_strategy(MODEL)
    assert isinstance(kind, image_models.ImagesModels)
    sweeps = []
    list_artifacts = ledger.list_artifacts
    ledger.list_artifacts = lambda *a, **k: sweeps.append(a) or list_artifacts(*a, **k)  # type: ignore[method-assign]

    kind.sync_collection(MODEL, collection)
    assert collection.read_bytes("p1") == png and len(sweeps) == 1
    kind.sync_collection(MODEL, collection)
    assert len(sweeps) == 1  # nothing changed: no sweep

    collection.replace("p1", encode_png(source), collection.entry("p1").objects)  # an operator's restore
    kind.sync_collection(MODEL, collection)
    assert collection.read_bytes("p1") == png and len(sweeps) == 2

    kept = list(image_models.originals_root(store, MODEL).glob("*.png"))
    assert kept
    cfg.models[MODEL].retain_originals_s = 0.001  # the window ends
    time.sleep(0.01)
    kind.sync_collection(MODEL, collection)
    assert len(sweeps) == 2 and not any(p.exists() for p in kept)


def test_the_demo_collection_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """The index marks a collection as there. Built in place, a build that a crash cut short after two canvases
    was taken for the whole collection at the next start (and CI caught a reader seeing 2 of 3). Now it is built
    beside its place and renamed in whole; what a cut-short build left is cleared at the next one."""
    from adapters.images import demo

    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(f'[state]\ndir = "var"\n[models.{MODEL}]\nkind = "images"\n[models.{MODEL}.bootstrap]\n'
                        'recipe = "images"\ncollection_size = 3\n')
    cfg = config_mod.load(cfg_path, env={})
    store, ledger = ArtifactStore(cfg.state.artifacts_path), Ledger(cfg.state.ledger_path)
    kind = ModelRegistry(cfg, store, ledger).kind_strategy(MODEL)
    root = image_models.collection_root(store, MODEL, cfg.models[MODEL])
    build = demo.build_collection

    def cut_short(where, rows, recipe):
        build(where, rows, dataclasses.replace(recipe, collection_size=2))  # two canvases written, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_collection", cut_short)
    with pytest.raises(KeyboardInterrupt):
        kind.collection(MODEL)
    assert not root.exists() and not list(root.parent.glob(".*building*"))
    monkeypatch.setattr(demo, "build_collection", build)
    killed = root.parent / f".{root.name}.building-0dead"  # what a kill -9 mid-build leaves
    killed.mkdir()
    assert kind.collection(MODEL).ids() == ["canvas-0000", "canvas-0001", "canvas-0002"]
    assert ImageCollection(root).ids() == ["canvas-0000", "canvas-0001", "canvas-0002"]  # as a restart reads it
    assert not killed.exists()
