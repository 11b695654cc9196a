"""FAISS storage of forget features: ids that map to the request, removable on rollback.

Every vector is L2-normalised (inner product = cosine) and carries the id `key << 20 | row`, where `key` is a
40-bit hash of the request's adapter id: any id found by a search names its request without a lookup table,
and a rollback removes exactly one request's vectors with one `remove_ids(IDSelectorRange)`.

Two uses: a per-request, per-layer bank (the local term of the glocal score; small, searched only for
candidate requests) and the router's shared index over one layer of every request (one search per input).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import cast

import faiss
import numpy as np

# Every search here is small (a request's bank: tens of vectors; the shared index: one query batch). OpenMP
# fan-out costs more than it saves: 24 ms vs <0.1 ms per bank search measured on a busy 2-core machine.
faiss.omp_set_num_threads(1)

ROW_BITS = 20  # up to ~1M forget samples per request
KEY_BITS = 40  # 40 + 20 bits < 63: ids stay positive int64


def request_key(adapter_id: str) -> int:
    return int.from_bytes(hashlib.sha256(adapter_id.encode()).digest()[:KEY_BITS // 8], "big")


def key_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, np.int64) >> ROW_BITS


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def new_index(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def add_request(index: faiss.IndexIDMap2, key: int, vectors: np.ndarray, first_row: int = 0) -> None:
    """Add one request's vectors (already normalised) under ids key<<20 | row, rows from `first_row` on."""
    if first_row + len(vectors) >= 1 << ROW_BITS:
        raise ValueError(f"at most {1 << ROW_BITS} vectors per request")
    ids = (np.int64(key) << ROW_BITS) + np.arange(first_row, first_row + len(vectors), dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)


def remove_request(index: faiss.IndexIDMap2, key: int) -> int:
    """Remove every vector of one request; returns how many were removed."""
    lo = np.int64(key) << ROW_BITS
    return int(index.remove_ids(faiss.IDSelectorRange(int(lo), int(lo + (1 << ROW_BITS)))))


def vectors_and_ids(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """Everything an IndexIDMap2 over a flat index holds, to merge it into another index."""
    n = index.ntotal
    vecs = index.index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)
    return np.asarray(vecs, np.float32), faiss.vector_to_array(index.id_map).astype(np.int64)


def gpu_search_copy(index: faiss.IndexIDMap2, device: int) -> GpuSearchCopy | None:
    """A GPU copy of `index` for searching when faiss has GPU support (the `faiss-gpu-cu12` build) and a GPU;
    None otherwise (search the CPU index)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= device:
        return None
    return GpuSearchCopy(index, device)


class GpuSearchCopy:
    """Search-only snapshot of an IndexIDMap2 over a flat index, its vectors on a GPU.

    The CPU index stays the one that is changed (add_with_ids, and remove_ids on rollback, which faiss's GPU flat
    index does not offer) and persisted; a copy is taken after each change. Its results are the CPU index's: same
    vectors, exact inner-product search, positions mapped back to the same ids."""

    def __init__(self, index: faiss.IndexIDMap2, device: int):
        vectors, self.ids = vectors_and_ids(index)
        self.resources = faiss.StandardGpuResources()  # referenced for the copy's lifetime
        config = faiss.GpuIndexFlatConfig()
        config.device = device
        self.flat = faiss.GpuIndexFlatIP(self.resources, index.d, config)
        self.flat.add(vectors)
        self.ntotal = self.flat.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, rows = self.flat.search(queries, k)
        return sims, np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)


def write(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read(path: Path) -> faiss.IndexIDMap2:
    return cast(faiss.IndexIDMap2, faiss.read_index(str(path)))  # written from new_index
