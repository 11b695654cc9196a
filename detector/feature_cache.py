"""The features of texts the encoder saw lately, so a text is encoded once while it keeps coming back.

A chat client sends the whole conversation with every request, and the router reads every turn
(detector/inputs.py): without a cache, turn n of a conversation costs n encoder rows, each an earlier request's
work again. The encoder is frozen, so a text's features never change: a text found here is not encoded again.

Entries are keyed by a digest of the text, never the text itself, and evicted least recently used first. The
features stored are the rows `encode` returned for the text in whatever batch first held it: padding can move a
row by float rounding (around 1e-7), no more.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

Encode = Callable[[list[str]], np.ndarray]
OnLookup = Callable[[int, int], None]  # (hits, misses) of one call, e.g. for metrics


def text_key(text: str) -> bytes:
    # surrogatepass: a lone surrogate (JSON can carry one) still has a key; serve refuses such text before this
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class FeatureCache:
    """At most `entries` texts' features, least recently used evicted first; safe to share between threads."""

    def __init__(self, entries: int, on_lookup: OnLookup | None = None):
        if entries < 1:
            raise ValueError(f"entries: at least 1, not {entries}")
        self.entries = entries
        self.on_lookup = on_lookup
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # held for lookups and stores, never while encoding

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, texts: Sequence[str], encode: Encode) -> np.ndarray:
        """`encode(texts)`, with the texts found here taken from here and the others encoded in one call (each
        distinct text once) and kept."""
        keys = [text_key(t) for t in texts]
        with self._lock:
            found = {k: row for k in dict.fromkeys(keys) if (row := self._take(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            first_text = dict(zip(keys, texts, strict=True))  # any of a key's texts: they are one text
            fresh = encode([first_text[k] for k in missing])
            rows = {k: _frozen(row) for k, row in zip(missing, fresh, strict=True)}
            with self._lock:
                for k, row in rows.items():
                    self._put(k, row)
            found.update(rows)
        if self.on_lookup is not None:
            missed = set(missing)
            misses = sum(k in missed for k in keys)
            self.on_lookup(len(keys) - misses, misses)
        if not keys:
            return encode([])
        return np.stack([found[k] for k in keys])

    def _take(self, key: bytes) -> np.ndarray | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def _put(self, key: bytes, row: np.ndarray) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.entries:
            self._rows.popitem(last=False)


def _frozen(row: np.ndarray) -> np.ndarray:
    """A read-only copy: callers get stacked copies, and nothing may change what later requests read."""
    row = np.array(row, dtype=np.float32, copy=True)
    row.setflags(write=False)
    return row
