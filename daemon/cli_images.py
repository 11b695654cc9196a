"""`unlearnd images ...`: the stored images of `kind = "images"` models and the erasures applied to them.

Read-only: both commands read the collection and the ledger directly, so they work whether or not the daemon
is running. `show --out` renders the image: the original (mask box outlined) next to the edited result while
the original still exists (retained, or an erasure not yet swapped in), the result alone once it is deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon.cli_common import ConfigOpt, JsonOpt, console, emit, fail, load_config, open_ledger, print_json
from daemon.config import Config

if TYPE_CHECKING:
    from adapters.images.collection import ImageCollection
    from adapters.store import ArtifactStore

images_app = typer.Typer(help="Stored images of image collection models: list, show (before/after).",
                         no_args_is_help=True)


def _image_models(cfg: Config, model: str | None) -> list[str]:
    names = [n for n, s in cfg.models.items() if s.kind == "images"]
    if model is not None:
        if model not in names:
            fail(f"{model!r} is not an images model of {cfg.source} (images models: {names or 'none'})", 2)
        return [model]
    if not names:
        fail(f"{cfg.source} registers no images model", 2)
    return names


def _store(cfg: Config) -> ArtifactStore:
    from adapters.store import ArtifactStore

    return ArtifactStore(cfg.state.artifacts_path)


def _collection(cfg: Config, name: str) -> ImageCollection:
    from adapters.images.collection import INDEX_FILE, ImageCollection
    from daemon import image_models

    root = image_models.collection_root(_store(cfg), name, cfg.models[name])
    if not (root / INDEX_FILE).is_file():
        fail(f"model {name!r} has no collection at {root} yet (`unlearnd run` builds the demo one)")
    return ImageCollection(root)


@images_app.command("list")
def images_list(model: Annotated[str | None, typer.Option(help="An images model (default: all).")] = None,
                as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Images of the collection(s): id, size, objects, sha256, erasures applied."""
    cfg = load_config(config)
    ledger = open_ledger(cfg)
    rows: list[dict[str, Any]] = []
    for name in _image_models(cfg, model):
        erased: dict[str, int] = {}
        for a in ledger.list_artifacts(name, "erasure"):
            image = a.info.get("receipt", {}).get("image")
            erased[image] = erased.get(image, 0) + 1
        collection = _collection(cfg, name)
        for image_id in collection.ids():
            e = collection.entry(image_id)
            rows.append({"model": name, "image": image_id, "size": "x".join(map(str, e.shape[1:])),
                         "objects": len(e.objects), "erasures": erased.get(image_id, 0), "sha256": e.sha256[:12]})
    emit(rows, ["model", "image", "size", "objects", "erasures", "sha256"], as_json, "images")


@images_app.command("show")
def images_show(image_id: str,
                out: Annotated[Path | None, typer.Option(help="Write a PNG: before/after while the original "
                                                         "exists, else the image alone.")] = None,
                model: Annotated[str | None, typer.Option(help="The images model (default: the one holding "
                                                          "the id).")] = None,
                as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One image: its current hash and every erasure applied to it (receipt hashes, mask box, original kept or
    deleted)."""
    import torch

    from adapters.images import render
    from adapters.images.collection import decode_png
    from adapters.images.erasure import IMAGE_FILE
    from daemon import image_models

    cfg = load_config(config)
    ledger = open_ledger(cfg)
    owners = [n for n in _image_models(cfg, model) if image_id in _collection(cfg, n)]
    if not owners:
        fail(f"no image {image_id!r} in the collection of {model or 'any images model'}")
    name = owners[0]
    collection, store = _collection(cfg, name), _store(cfg)
    entry = collection.entry(image_id)
    erasures = [a for a in ledger.list_artifacts(name, "erasure") if a.info.get("receipt", {}).get("image") == image_id]
    history: list[dict[str, Any]] = []
    for a in erasures:
        r = a.info["receipt"]
        kept = image_models.retained_original(store, name, image_id, r["source_sha256"])
        pending = entry.sha256 == r["source_sha256"]  # recorded, not yet swapped in (the daemon does it next)
        history.append({"erasure": a.id, "request_id": a.request_id, "source_sha256": r["source_sha256"],
                        "result_sha256": r["result_sha256"], "mask_sha256": r["mask_sha256"],
                        "mask_box": r["mask_box"], "original": "pending deletion" if pending else
                        "retained" if kept else "deleted"})
    shown = "image"
    if out is not None:
        current = collection.load(image_id)
        if erasures:
            last, r = erasures[-1], erasures[-1].info["receipt"]
            after = decode_png((Path(last.path) / IMAGE_FILE).read_bytes())
            kept = image_models.retained_original(store, name, image_id, r["source_sha256"])
            before = decode_png(kept.read_bytes()) if kept else current if entry.sha256 == r["source_sha256"] \
                else None
            box = torch.zeros(after.shape[-2:], dtype=torch.bool)
            x0, y0, x1, y1 = r["mask_box"]
            box[y0:y1, x0:x1] = True
            png = render.before_after_png(after, before, box)
            shown = "before/after" if before is not None else "result (original deleted)"
        else:
            png = render.before_after_png(current)
            shown = "image (no erasure)"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
    d: dict[str, Any] = {"model": name, "image": image_id, "shape": list(entry.shape), "sha256": entry.sha256,
                         "objects": [o.to_dict() for o in entry.objects], "erasures": history}
    if out is not None:
        d["out"], d["rendered"] = str(out), shown
    if as_json:
        print_json(d)
        return
    console.print(f"[bold]{name}[/] {image_id}: {d['shape'][2]}x{d['shape'][1]}, {len(entry.objects)} object(s), "
                  f"sha256 {entry.sha256[:16]}")
    for o in entry.objects:
        console.print(f"  object {o.label if o.label is not None else '?'} at box {list(o.box)}")
    for h in history:
        console.print(f"  {h['erasure']} (request {h['request_id']}): mask box {h['mask_box']}, source "
                      f"{h['source_sha256'][:16]} -> result {h['result_sha256'][:16]}, original {h['original']}")
    if not history:
        console.print("  no erasure recorded")
    if out is not None:
        console.print(f"wrote {out} ({shown})")
