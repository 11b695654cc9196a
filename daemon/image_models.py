"""The images model kind in the daemon: an image collection, the diffusion model its erasures run on, and what an
erasure does to the collection once it is durable.

ModelRegistry (daemon/models.py) hands models of kind "images" to this strategy.

- Collection: `models.<name>.collection`, or `<artifacts>/<name>/collection`, which `bootstrap.recipe = "images"`
  fills with the demo canvases (adapters/images/demo.py; seconds).
- Diffusion model: the ledger's head version (`versions/vNNNN/model.safetensors`; its DDPMSpec in the ledger's
  `info`). The demo DDPM trains for minutes, so by default it is built in the background once the daemon is
  consuming (models.<name>.bootstrap.when), the collection first, as a diffusion model's first version is
  (daemon/bootstrapping.py): until it exists, requests for the model wait (ModelNotReady, the `bootstrapping`
  pause). It is kept as version v0000; later starts load it.
- Erasure: the engine's artifact (`erasures/eNNNN/image.png` + `receipt.json`) is published and recorded first;
  then (`after_commit`) the collection's file is swapped for the edited one (`apply_erasures`). The original is
  deleted, or, with `retain_originals_s > 0`, moved to `<artifacts>/<name>/originals/` and deleted once that many
  seconds have passed. The collection is also synced at start and before every request (`sync_collection`: a
  full sweep when the ledger's erasures or the collection changed since the last one), so a crash between the
  ledger and the swap only delays the deletion, never skips it. An erasure edits data, not weights: the head
  version stays where it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.base import Change, Forget
from adapters.devices import resolve_device
from adapters.store import ArtifactStore, fsync_dir
from daemon.bootstrapping import ModelNotReady, override, progress_logger
from daemon.config import Model
from daemon.ledger import ArtifactRow, Ledger
from daemon.model_kind import ModelKind

if TYPE_CHECKING:  # torch-heavy: imported where used
    from adapters.images.collection import ImageCollection
    from adapters.images.demo import Recipe
    from adapters.images.erasure import ImagesTarget
    from daemon.models import ModelRegistry

log = logging.getLogger(__name__)

COLLECTION_DIR = "collection"
ORIGINALS_DIR = "originals"
ERASURES = "erasures"  # the store folder of erasure artifacts


def collection_root(store: ArtifactStore, name: str, spec: Model) -> Path:
    return Path(spec.collection) if spec.collection else store.root / name / COLLECTION_DIR


def originals_root(store: ArtifactStore, name: str) -> Path:
    return store.root / name / ORIGINALS_DIR


def recipe(spec: Model) -> Recipe | None:
    """The demo recipe (adapters/images/demo.py) with the model's [bootstrap] settings over its defaults; None
    unless bootstrap.recipe = "images". Raises ValueError naming a key the recipe does not know."""
    from adapters.images import demo

    b = spec.bootstrap
    if b.recipe != "images":
        return None
    base = demo.Recipe()
    return dataclasses.replace(base, spec=override(base.spec, b.ddpm, "ddpm"),
                               train=override(base.train, b.train, "train"),
                               collection_size=b.collection_size or base.collection_size,
                               canvases=b.train_canvases or base.canvases)


class ImagesModels(ModelKind):
    """Per-kind strategy of ModelRegistry for image collections and the DDPM that erases objects from them."""

    dtypes = ("float32",)

    def __init__(self, registry: ModelRegistry):
        super().__init__(registry)
        self._cache: dict[str, tuple[str, ImagesTarget]] = {}  # model -> (head id, target)
        # model -> (erasure rows, collection stamp) at its last full sweep (see `sync_collection`)
        self._swept: dict[str, tuple[int, tuple[int, int, int] | None]] = {}
        self._collections: dict[str, ImageCollection] = {}  # model -> its collection (one writer: this process)
        # model -> (erasure rows, their (image, mask SHA-256) pairs): re-read only when the row count moves
        self._erased: dict[str, tuple[int, frozenset[tuple[str, str]]]] = {}

    def check(self, name: str, spec: Model) -> None:
        """Start-up check of the model's bootstrap settings (raises ValueError)."""
        b = spec.bootstrap
        if b.recipe not in ("images", "none"):
            raise ValueError(f"bootstrap.recipe {b.recipe!r} does not build an images model (use 'images', or "
                             "'none' with a collection and a recorded diffusion model)")
        if b.recipe == "images" and b.dataset != "mnist":
            raise ValueError(f"bootstrap.dataset {b.dataset!r}: the demo canvases are drawn from MNIST digits")
        if b.recipe == "none" and self.ledger.head(name) is None:  # nothing could ever serve its requests
            raise ValueError("bootstrap.recipe: 'none' builds no diffusion model and the ledger has no version of "
                             "it (use recipe = \"images\" for the demo DDPM)")
        recipe(spec)

    def check_ready(self, name: str) -> None:
        if self.ledger.head(name) is None:
            raise ModelNotReady(name)

    def precheck(self, name: str, forget: Forget) -> None:
        """What can be told without the collection or the model: the kind of request, the image id's form, the
        mask's presence (InvalidForget with its reason). Whether the image and the mask fit waits for the engine."""
        from adapters.images.erasure import request_mask

        request_mask(forget)

    # --- the collection ---------------------------------------------------------------------------------------

    def collection(self, name: str) -> ImageCollection:
        """The model's collection, re-read from disk (another process may have changed it: a replica that owned
        the model before, an isolated run); the demo one is built on first use when the recipe asks for it."""
        from adapters import datasets
        from adapters.images import demo
        from adapters.images.collection import INDEX_FILE, ImageCollection

        spec = self.registry.spec(name)
        root = collection_root(self.store, name, spec)
        collection = self._collections.get(name)
        if (root / INDEX_FILE).is_file():
            if collection is None:
                collection = self._collections[name] = ImageCollection(root)
            else:
                collection.refresh()
            return collection
        r = recipe(spec)
        if r is None:
            raise RuntimeError(f"model {name!r}: no image collection at {root} (set models.{name}.collection, or "
                               "bootstrap.recipe = \"images\" for the demo one)")
        log.info("bootstrapping %s: %d demo canvases from the registered MNIST training rows into %s", name,
                 r.collection_size, root)
        # Built beside its place and renamed into it whole: the index is what marks a collection as there, so one
        # built in place and cut short by a crash would be taken for the whole collection at the next start (and a
        # reader would see it grow).
        for stale in root.parent.glob(f".{root.name}.building-*"):  # a build a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
        staging = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:8]}"
        try:
            demo.build_collection(staging, datasets.mnist(seed=spec.bootstrap.seed).train, r)
            if root.exists():  # no index: nothing of a collection (an empty folder someone made), or refuse
                if any(root.iterdir()):
                    raise RuntimeError(f"model {name!r}: {root} holds files but no {INDEX_FILE}; move them away "
                                       "for the demo collection to be built there")
                root.rmdir()
            os.replace(staging, root)
            fsync_dir(root.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        collection = self._collections[name] = ImageCollection(root)
        return collection

    def _others(self, name: str) -> dict[str, ImageCollection]:
        """The other images models' collections that exist (a request sent to the wrong model is named so)."""
        from adapters.images.collection import INDEX_FILE, ImageCollection

        others = {}
        for other, spec in self.config.models.items():
            root = collection_root(self.store, other, spec)
            if other != name and spec.kind == "images" and (root / INDEX_FILE).is_file():
                others[other] = ImageCollection(root)
        return others

    # --- bootstrap --------------------------------------------------------------------------------------------

    def bootstrap(self, name: str, spec: Model, *, progress: bool = True,
                  stop: threading.Event | None = None) -> ArtifactRow | None:
        """Build (or find) the collection and finish any recorded erasure; then, if the ledger has no version,
        train the demo DDPM (progress in the log) and record it. Raises training.TrainingStopped when `stop` is
        set."""
        from safetensors.torch import save_file

        from adapters import datasets
        from adapters.diffusion import ddpm
        from adapters.images import demo

        collection = self.collection(name)
        self.sync_collection(name, collection)
        head = self.ledger.head(name)
        if head is not None:
            return head
        r = recipe(spec)
        if r is None:
            raise RuntimeError(f"model {name!r} has no diffusion model version and bootstrap.recipe = "
                               f"{spec.bootstrap.recipe!r} cannot build one")
        rows = datasets.mnist(seed=spec.bootstrap.seed).train
        log.info("bootstrapping %s (%d images): training an unconditional DDPM (%dx%d, channels %s) on %d canvases "
                 "for %d steps; requests for it wait until it is ready", name, len(collection), r.spec.resolution,
                 r.spec.resolution, list(r.spec.channels), r.canvases, r.train.steps)
        report = progress_logger(name, log)
        started = time.perf_counter()
        model = demo.train_model(rows, r, on_step=lambda step, total, loss: report("ddpm", step, total), stop=stop,
                                 device=resolve_device(spec.device))
        info = {"spec": r.spec.to_dict(), "recipe": "images-demo"}
        metrics = {"train_seconds": time.perf_counter() - started, "train_steps": float(r.train.steps)}
        version = self.ledger.allocate_id(name, "version")
        art = self.store.publish(name, "versions", version,
                                 lambda d: save_file(ddpm.state_of(model), str(d / ddpm.WEIGHTS_FILE)),
                                 {"parent": None, "metrics": metrics, **info})
        self.ledger.add_artifact(name, version, "version", parent=None, request_id=None, path=str(art.path),
                                 sha256=art.sha256, metrics=metrics, info=info)
        log.info("registered %s %s (demo DDPM, trained in %.0fs)", name, version, metrics["train_seconds"])
        return self.ledger.head(name)

    # --- targets and changes ----------------------------------------------------------------------------------

    def target(self, name: str) -> ImagesTarget:
        """The collection and the head DDPM, every recorded erasure swapped in. Raises ModelNotReady before the
        first version."""
        from adapters.diffusion import ddpm
        from adapters.images.erasure import ImagesTarget

        head = self.ledger.head(name)
        if head is None:
            raise ModelNotReady(name)
        collection = self.collection(name)
        cached = self._cache.get(name)
        if cached and cached[0] == head.id:
            target = cached[1]
        else:
            spec = ddpm.DDPMSpec.from_dict(head.info["spec"])
            model = ddpm.load_weights(spec, Path(head.path) / ddpm.WEIGHTS_FILE,
                                      resolve_device(self.registry.spec(name).device))
            target = ImagesTarget(name=name, version=head.id, collection=collection, model=model, spec=spec)
            self._cache[name] = (head.id, target)
        target.others = self._others(name)
        target.erased = self._erasures(name)
        self.sync_collection(name, collection)
        return target

    def _erasures(self, name: str) -> frozenset[tuple[str, str]]:
        """(image id, mask SHA-256) of every erasure the ledger records for the model (the same erasure asked again
        is answered unchanged)."""
        recorded = self.ledger.count_artifacts(name, "erasure")
        if self._erased.get(name, (-1,))[0] != recorded:
            pairs = frozenset((receipt["image"], receipt["mask_sha256"])
                              for row in self.ledger.list_artifacts(name, "erasure")
                              if (receipt := row.info.get("receipt")) and "mask_sha256" in receipt)
            self._erased[name] = (recorded, pairs)
        return self._erased[name][1]

    def after_commit(self, name: str, change: Change, target: Any, artifact_id: str) -> None:
        """The erasure is durable and recorded: now the collection's original goes (or is set aside)."""
        self.sync_collection(name, target.collection)

    def sync_collection(self, name: str, collection: ImageCollection) -> None:
        """Make the collection hold every recorded erasure and no expired original. The full sweep
        (`apply_erasures`) reads every erasure row of the ledger, so it runs only when the number of rows or the
        collection's files changed since this process's last sweep (a new erasure, one recorded by another
        process, a crash before the swap, an operator's restore); otherwise only expired originals are purged."""
        spec = self.registry.spec(name)
        recorded = self.ledger.count_artifacts(name, "erasure")
        if self._swept.get(name) == (recorded, collection.stamp()):
            purge_originals(self.store, name, spec.retain_originals_s)
            return
        apply_erasures(self.store, self.ledger, name, spec, collection)
        self._swept[name] = (recorded, collection.stamp())

    def receipt(self, name: str, change: Change, artifact_id: str) -> dict[str, Any] | None:
        receipt = change.info.get("receipt")
        if receipt is None:
            return None
        kept = self.registry.spec(name).retain_originals_s > 0
        return {"erasure": artifact_id, **receipt, "original": "retained" if kept else "deleted"}

    def on_rollback(self, name: str) -> None:
        self._cache.pop(name, None)


def apply_erasures(store: ArtifactStore, ledger: Ledger, name: str, spec: Model, collection: ImageCollection) -> int:
    """Make the collection hold every recorded erasure's result and no original beyond its retention: each
    erasure whose source is still the collection's file swaps it for the result (the original deleted, or moved
    aside when retained). Idempotent; returns how many images it swapped."""
    from adapters.images.erasure import IMAGE_FILE

    swapped = 0
    for row in ledger.list_artifacts(name, "erasure"):  # oldest first: erasures of one image chain in order
        receipt = row.info.get("receipt") or {}
        image_id = receipt.get("image")
        if not isinstance(image_id, str) or image_id not in collection \
                or collection.entry(image_id).sha256 != receipt.get("source_sha256"):
            continue
        entry = collection.entry(image_id)
        if spec.retain_originals_s > 0:
            kept = originals_root(store, name)
            kept.mkdir(parents=True, exist_ok=True)
            (kept / f"{image_id}.{entry.sha256[:16]}.png").write_bytes(collection.read_bytes(image_id))
        x0, y0, x1, y1 = receipt["mask_box"]
        objects = tuple(o for o in entry.objects if not (x0 <= o.box[0] and y0 <= o.box[1] and o.box[2] <= x1
                                                         and o.box[3] <= y1))  # the erased object's box goes
        collection.replace(image_id, (Path(row.path) / IMAGE_FILE).read_bytes(), objects)
        swapped += 1  # (the log names the erasure, not the image: the ledger links the two)
        log.info("%s: erasure %s swapped into the collection; original %s", name, row.id,
                 f"kept {spec.retain_originals_s:.0f}s" if spec.retain_originals_s > 0 else "deleted")
    purge_originals(store, name, spec.retain_originals_s)
    return swapped


def purge_originals(store: ArtifactStore, name: str, retain_s: float) -> int:
    """Delete retained originals older than `retain_s` seconds (all of them when retention is off)."""
    folder = originals_root(store, name)
    if not folder.is_dir():
        return 0
    cutoff, purged = time.time() - retain_s, 0
    for path in folder.glob("*.png"):
        if retain_s <= 0 or path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            purged += 1
    if purged:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return purged


def retained_original(store: ArtifactStore, name: str, image_id: str, source_sha256: str) -> Path | None:
    path = originals_root(store, name) / f"{image_id}.{source_sha256[:16]}.png"
    return path if path.is_file() else None
