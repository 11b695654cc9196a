"""The artifact store: model versions and adapters as directories on local disk.

Layout, one tree per registered model::

    <root>/<model>/versions/<version_id>/   model.safetensors + meta.json
    <root>/<model>/adapters/<adapter_id>/   PEFT's own adapter layout + meta.json
    <root>/<model>/<anything else>/         model-kind data (registered dataset, converted base model)

Every artifact is published atomically: written into a staging directory on the same filesystem, each file
and the directory fsynced, then renamed into place. A crash leaves either the old state or the new one, never
half a directory; a retried request may publish the same id again and replaces the orphan of a crashed try.
Which artifact is *active* is not the store's business: the ledger records that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

META_FILE = "meta.json"


@dataclass(frozen=True)
class Artifact:
    model: str
    kind: str  # "versions" | "adapters" | a model-kind folder such as "dataset"
    id: str
    path: Path
    sha256: str


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()  # recorded paths (ledger, events, exports) work from any directory
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / ".staging"
        self._staging.mkdir(exist_ok=True)

    def path(self, model: str, kind: str, artifact_id: str) -> Path:
        return self.root / model / kind / artifact_id

    def publish(
        self, model: str, kind: str, artifact_id: str, write: Callable[[Path], None], meta: dict | None = None
    ) -> Artifact:
        """Run `write(staging_dir)`, then make the result durable at its final path in one rename."""
        staging = self._staging / f"{model}.{kind}.{artifact_id}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            write(staging)
            digest = tree_sha256(staging)
            (staging / META_FILE).write_text(
                json.dumps({**(meta or {}), "id": artifact_id, "sha256": digest}, indent=2)
            )
            _fsync_tree(staging)
            final = self.path(model, kind, artifact_id)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # orphan of a try that crashed before the ledger recorded it
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Artifact(model, kind, artifact_id, final, digest)

    def scratch_dir(self, label: str) -> Path:
        """A new empty directory on the store's filesystem, removed by `clean_staging` if a crash leaves it (e.g.
        where another process writes an artifact's files before they are published)."""
        path = self._staging / f"{label}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def meta(self, model: str, kind: str, artifact_id: str) -> dict:
        return json.loads((self.path(model, kind, artifact_id) / META_FILE).read_text())

    def verify(self, model: str, kind: str, artifact_id: str) -> bool:
        """Whether the files on disk still hash to what was recorded at publish time."""
        path = self.path(model, kind, artifact_id)
        return tree_sha256(path) == self.meta(model, kind, artifact_id)["sha256"]

    def clean_staging(self) -> int:
        """Remove leftovers of publishes interrupted by a crash; returns how many."""
        leftovers = list(self._staging.iterdir())
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return len(leftovers)


def tree_sha256(directory: Path) -> str:
    """SHA-256 over every file of a directory (relative names and contents), ignoring meta.json."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META_FILE):
        h.update(str(f.relative_to(directory)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
