"""A stored image collection: the images an erasure request edits, addressed by id.

Layout under the collection's root::

    images/<id>.png   8-bit grayscale or RGB, as a photo library stores them
    index.json        {id: {"sha256": file hash, "shape": [C, H, W], "objects": [{"box": [...], ...}]}}

Every write is atomic (a temporary file in the same folder, fsync, rename; the index the same way), so a crash
leaves the old state or the new one. `put` over an existing id replaces the file, and `remove` unlinks it:
the old pixels are no longer reachable through the collection (the filesystem may keep freed blocks until
they are reused; storage that must guarantee more needs encrypted volumes or secure deletion below this layer).
One process writes a collection at a time (the daemon's owner of the model); readers may run beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from adapters.store import fsync_dir

INDEX_FILE = "index.json"
IMAGES_DIR = "images"
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnknownImage(KeyError):
    """The collection has no image under this id."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class ObjectBox:
    """One object in an image: its box [x0, y0, x1, y1) in pixels (ends exclusive, like array slices) and,
    where known, its label and the registered training row it was drawn from (the demo's digits)."""

    box: tuple[int, int, int, int]
    label: int | None = None
    source_id: int | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None}

    @classmethod
    def from_dict(cls, values: dict) -> ObjectBox:
        x0, y0, x1, y1 = (int(v) for v in values["box"])
        return cls(box=(x0, y0, x1, y1), label=values.get("label"),
                   source_id=values.get("source_id"))


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    id: str
    sha256: str  # of the PNG file as stored
    shape: tuple[int, int, int]  # C, H, W
    objects: tuple[ObjectBox, ...] = ()


def check_id(image_id: str) -> str:
    """An id is 1-128 characters of [A-Za-z0-9._-], not starting with a dot or dash (it names a file)."""
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise ValueError(f"invalid image id {str(image_id)[:80]!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return image_id


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) with C = 1 (grayscale) or 3 (RGB) -> PNG bytes (deterministic for the same pixels)."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"images are uint8 (C, H, W) with C = 1 or 3, got {tuple(image.shape)} {image.dtype}")
    array = image.permute(1, 2, 0).contiguous().numpy()
    picture = Image.fromarray(array[:, :, 0], mode="L") if image.shape[0] == 1 else Image.fromarray(array, mode="RGB")
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return out.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 (C, H, W): grayscale stays one channel, anything else becomes RGB."""
    from PIL import Image

    picture = Image.open(io.BytesIO(data))
    picture = picture if picture.mode == "L" else picture.convert("RGB")
    array = np.asarray(picture, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ImageCollection:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self._index: dict[str, dict] = {}
        self.refresh()

    # ---- reading ----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the index from disk: what another process (an earlier owner of the collection) wrote since."""
        index = self.root / INDEX_FILE
        self._index = json.loads(index.read_text()) if index.is_file() else {}

    def stamp(self) -> tuple[int, int, int] | None:
        """Identifies the index file's current state (inode, mtime, size); any change to the collection, this
        process's or another's (atomic writes make a new file), gives a new stamp. None before the first image."""
        try:
            st = (self.root / INDEX_FILE).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def ids(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self._index)

    def entry(self, image_id: str) -> ImageEntry:
        try:
            raw = self._index[image_id]
        except (KeyError, TypeError):
            raise UnknownImage(f"no image {str(image_id)[:80]!r} in the collection at {self.root}") from None
        return ImageEntry(image_id, raw["sha256"], tuple(raw["shape"]),
                          tuple(ObjectBox.from_dict(o) for o in raw.get("objects", ())))

    def path(self, image_id: str) -> Path:
        return self.root / IMAGES_DIR / f"{check_id(image_id)}.png"

    def read_bytes(self, image_id: str) -> bytes:
        entry = self.entry(image_id)
        data = self.path(image_id).read_bytes()
        if sha256(data) != entry.sha256:
            raise OSError(f"image {image_id!r} does not match its recorded sha256 (changed outside the collection)")
        return data

    def load(self, image_id: str) -> torch.Tensor:
        """The image as uint8 (C, H, W), checked against its recorded hash."""
        return decode_png(self.read_bytes(image_id))

    # ---- writing ----------------------------------------------------------------------------------------------

    def put(self, image_id: str, image: torch.Tensor, objects: tuple[ObjectBox, ...] = ()) -> ImageEntry:
        """Store (or replace) an image and its object boxes; returns its entry (with the file's sha256)."""
        check_id(image_id)
        data = encode_png(image)
        _write_atomic(self.path(image_id), data)
        self._index[image_id] = {"sha256": sha256(data), "shape": list(image.shape),
                                 "objects": [o.to_dict() for o in objects]}
        self._save_index()
        return self.entry(image_id)

    def replace(self, image_id: str, data: bytes, objects: tuple[ObjectBox, ...]) -> ImageEntry:
        """Swap an existing image's file for other PNG bytes, kept byte for byte (so the file's hash is the one
        an erasure receipt recorded); the old file is renamed over, not left behind."""
        self.entry(image_id)
        image = decode_png(data)  # refuse anything that is not a PNG this collection can read
        _write_atomic(self.path(image_id), data)
        self._index[image_id] = {"sha256": sha256(data), "shape": list(image.shape),
                                 "objects": [o.to_dict() for o in objects]}
        self._save_index()
        return self.entry(image_id)

    def remove(self, image_id: str) -> None:
        """Delete an image and its entry. The pixels go first: a crash between the two leaves an entry whose
        file is gone (loading it fails; removing it again completes), never pixels that the index forgot."""
        self.entry(image_id)
        path = self.path(image_id)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        del self._index[image_id]
        self._save_index()

    def _save_index(self) -> None:
        _write_atomic(self.root / INDEX_FILE, json.dumps(self._index, indent=1, sort_keys=True).encode())
