"""The artifact store: model versions and adapters as directories on local disk.

Layout, one tree per registered model::

    <root>/<model>/versions/<version_id>/   model.safetensors + meta.json
    <root>/<model>/adapters/<adapter_id>/   PEFT's own adapter layout + meta.json
    <root>/<model>/<anything else>/         model-kind data (registered dataset, converted base model)

Every artifact is published atomically: written into a staging directory on the same filesystem, each file
and the directory fsynced, then renamed into place. A crash leaves either the old state or the new one, never
half a directory; a retried request may publish the same id again and replaces the orphan of a crashed try.
Which artifact is *active* is not the store's business: the ledger records that.

Several processes may share one store (replicas on a shared volume, and the child process of an isolated run).
Each stages under a directory of its own in `<root>/.staging/`, next to a lock file it holds (flock) for as long as
it lives; `clean_staging` removes only what writers that no longer run left behind, never a live replica's write
in progress.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

META_FILE = "meta.json"
LOCK_SUFFIX = ".lock"
# A lock file this young may belong to a writer between creating and locking it; and staging entries without a
# lock file (the layout before per-process staging) are removed once this old.
UNLOCKED_GRACE_S = 600.0


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
        self._staging_root = self.root / ".staging"
        self._staging_root.mkdir(exist_ok=True)
        self._mine: Path | None = None  # this process's staging directory, made on first use
        self._lock_fd: int | None = None

    @property
    def _staging(self) -> Path:
        """This process's staging directory: created on first use, its lock file held until `close` or exit."""
        if self._mine is None or self._lock_fd is None:
            name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            fd = os.open(self._staging_root / f"{name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self._mine = fd, self._staging_root / name
        self._mine.mkdir(exist_ok=True)  # also after another process removed it as empty
        return self._mine

    def close(self) -> None:
        """Give up this process's staging directory (its unfinished writes with it) and its lock."""
        if self._mine is not None and self._lock_fd is not None:
            shutil.rmtree(self._mine, ignore_errors=True)
            Path(f"{self._mine}{LOCK_SUFFIX}").unlink(missing_ok=True)
            os.close(self._lock_fd)
        self._mine, self._lock_fd = None, None

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
            fsync_dir(final.parent)
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
        """Remove what writers that no longer run left in the staging area (a crash mid-publish); returns how many
        staging directories went. A live writer's directory, this process's or another replica's, is left alone."""
        removed = 0
        for entry in list(self._staging_root.iterdir()):
            if entry.name.endswith(LOCK_SUFFIX) or entry == self._mine:
                continue
            lock = entry.with_name(entry.name + LOCK_SUFFIX)
            if lock.exists() and not _owner_gone(lock) or not lock.exists() and _age_s(entry) < UNLOCKED_GRACE_S:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed += 1
        for lock in self._staging_root.glob(f"*{LOCK_SUFFIX}"):  # writers gone that never staged anything
            if not lock.with_suffix("").exists() and lock != Path(f"{self._mine}{LOCK_SUFFIX}") and _owner_gone(lock):
                lock.unlink(missing_ok=True)
        return removed


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _owner_gone(lock: Path) -> bool:
    """Whether the process that held `lock` is gone: its flock can be taken (and a young lock file is given the
    benefit of the doubt: its writer may not have locked it yet)."""
    if _age_s(lock) < UNLOCKED_GRACE_S / 10:
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return True


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
        fsync_dir(d)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
