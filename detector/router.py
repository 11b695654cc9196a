"""The router serving uses: which unlearning adapters apply to an input, and with what weight.

Per batch of inputs: one encoder pass (features of every layer), ONE FAISS search of the routing layer over
every request's forget vectors, and the full glocal score (gate.py) only for the requests that search
returns as candidates. Cost: the encoder pass is constant, the flat search grows with the number of stored
vectors at ~d flops each (small next to the encoder pass up to many thousands of requests; bench/router.py), the
scoring grows with the number of candidates, not of requests. O3's reference code runs one
detector per request. For millions of vectors swap the flat index for HNSW/IVF (same ids, same remove_ids).

Weights: several requests apply to one input -> each adapter gets its own gate weight w; adapters below
`min_weight` are switched off (the calibration's sigmoid never goes below 0.12, so without a floor every adapter
would leak 12% into every input; O3's eval script uses a hard cut for the same reason). The router decides; w is
not the strength serving applies: a routed adapter is applied fully (detector/routed_model.py), w is reported.

Inputs are what the user asked (detector/inputs.py), the same form gates are fitted on; `route_requests` routes
a serving request given as several texts (its last user turn, and that turn with its context) in one pass.

Support: a look-alike asks a request's question about somebody else ("How many legs does a dog have?" against a
request about spiders). It sits near the ONE text written in its template, and MiniLM puts the two close (cosine up
to 0.79 on the tuning facts) because the template is most of the sentence. A paraphrase of the forgotten fact is
near several of the request's texts: the entity is in all of them. So a firing gate also needs the mean cosine to
the request's `support_k` nearest texts to reach `min_support`, unless the input is a near-copy of one text
(`near_copy_cos`). This is KNN-OOD's k-th neighbour where O3's local term uses the first.

Exact texts: an input that is one of the texts a request named (cosine >= EXACT_COS to one of its vectors) gets
that request's adapter at weight 1, whatever its gate and the margin say: verbatim forget data always routes.

Margin: each gate is calibrated on its own request's texts only, so each errs on its own, and with many similar
requests (the same form filled in for different people) some gate accepts almost any look-alike input. The one
shared search already tells which requests' texts an input is near; a gate that fires applies only if the input is
at least `margin` (cosine) nearer to its request's texts than to those of every near request whose gate stays
off. A true match is near its own request only; a look-alike is about as near to many. A request about the same
subject blocks only if its gate stays off and the input is within `margin` as near to it as to the firing
request (tested: two requests per person, recall unchanged).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.devices import device_of
from detector import index as fidx
from detector.gate import RequestGate

EXACT_COS = 0.999  # the same text up to float noise; distinct questions, even near-identical ones, stay below


@dataclass
class RouterConfig:
    routing_layer: int = -1  # layer whose vectors the shared index holds (last = the sentence embedding)
    candidates_k: int = 64  # neighbours retrieved per input by the one shared search
    # A neighbour this close makes its request a candidate: below every held-out paraphrase's nearest cosine on the
    # tuning data, so the cut only saves scoring work and never decides a route.
    candidate_min_cos: float = 0.7
    # Below this an adapter is off for the input: higher = fewer look-alike false activations, fewer held-out
    # paraphrases caught. Chosen on tuning data only (bench/serving.py --facts tuning, bench/router.py
    # small_requests), as the value that keeps false activations within the 2 % target. Config: [serve] min_weight.
    min_weight: float = 0.45
    # Cosine by which an input must be nearer to an applied request's texts than to any near request whose gate
    # stays off (module docstring): the largest margin that cost no held-out hit on the tuning seeds
    # (bench/router.py). Config: [serve] margin.
    margin: float = 0.06
    # Support (module docstring): an input's mean cosine to a request's `support_k` nearest texts must reach
    # `min_support` for its gate to apply, unless one text is at least `near_copy_cos` near. Chosen on the tuning
    # facts only (bench/known_facts.py TUNING, with its short-entity families whose look-alikes are hard): the
    # middle of the gap between held-out paraphrases (lowest 0.796) and look-alikes (highest 0.772), rounded down;
    # `near_copy_cos` well above every look-alike's nearest cosine there (0.79). Config: [serve] min_support.
    support_k: int = 2
    min_support: float = 0.78
    near_copy_cos: float = 0.9


class Router:
    def __init__(self, encoder, config: RouterConfig | None = None):
        self.encoder = encoder
        self.config = config or RouterConfig()
        self.gates: dict[str, RequestGate] = {}
        self._by_key: dict[int, str] = {}
        self._index = fidx.new_index(encoder.dim)
        # Searched on the GPU when faiss has GPU support and the encoder runs on CUDA (a copy taken after changes)
        model = getattr(encoder, "model", None)
        device = device_of(model) if model is not None else None
        self._gpu = (device.index or 0) if device is not None and device.type == "cuda" else None
        self._search_copy: Any = None  # the GPU snapshot of the index (or the index itself) searches read
        self._lock = threading.RLock()  # serve adds/removes adapters while requests are being routed

    # --- lifecycle ---------------------------------------------------------------------------------
    def add(self, adapter_id: str, gate_dir: str | Path) -> None:
        """Load a persisted gate and make its adapter routable (replaces an earlier gate of that id)."""
        self.add_gate(adapter_id, RequestGate.load(Path(gate_dir)))

    def add_gate(self, adapter_id: str, gate: RequestGate) -> None:
        if gate.adapter_id != adapter_id:
            raise ValueError(f"gate was fitted for {gate.adapter_id!r}, not {adapter_id!r}")
        key = gate.key
        with self._lock:
            other = self._by_key.get(key)
            if other is not None and other != adapter_id:
                raise ValueError(f"id-key collision between adapters {other!r} and {adapter_id!r}")
            if adapter_id in self.gates:
                self.remove(adapter_id)
            vecs, ids = fidx.vectors_and_ids(gate.bank_of_layer(self.config.routing_layer, self.encoder.n_layers))
            self._index.add_with_ids(vecs, ids)
            self._search_copy = None
            self.gates[adapter_id] = gate
            self._by_key[key] = adapter_id

    def remove(self, adapter_id: str) -> int:
        """Rollback: drop the adapter's vectors from the shared index and its gate; returns vectors removed."""
        with self._lock:
            gate = self.gates.pop(adapter_id, None)
            if gate is None:
                return 0
            self._by_key.pop(gate.key, None)
            self._search_copy = None
            return fidx.remove_request(self._index, gate.key)

    @property
    def n_vectors(self) -> int:
        return int(self._index.ntotal)

    # --- routing -----------------------------------------------------------------------------------
    def neighbours(self, feats: np.ndarray) -> list[dict[str, float]]:
        """Per input: adapter -> best cosine among the shared search's top `candidates_k` (one FAISS search)."""
        return [{name: sims[0] for name, sims in row.items()} for row, _ in self._nearest(feats)]

    def _nearest(self, feats: np.ndarray) -> list[tuple[dict[str, list[float]], float]]:
        """Per input: adapter -> its texts' cosines among the shared search's top `candidates_k`, best first, at
        most `support_k` of them; and the last cosine the search returned (one FAISS search)."""
        with self._lock:
            if self._index.ntotal == 0 or len(feats) == 0:
                return [({}, 0.0) for _ in range(len(feats))]
            q = fidx.normalise(feats[:, self.config.routing_layer, :])
            sims, ids = self._searched().search(q, min(self.config.candidates_k, self._index.ntotal))
            out = []
            for row_sims, row_ids in zip(sims, ids, strict=True):
                found: dict[str, list[float]] = {}
                for s, key in zip(row_sims, fidx.key_of(row_ids), strict=True):
                    name = self._by_key.get(int(key))
                    if name is not None:
                        kept = found.setdefault(name, [])  # results are sorted: the first is the best
                        if len(kept) < self.config.support_k:
                            kept.append(float(s))
                out.append((found, float(row_sims[-1])))
            return out

    def _support(self, row: dict[str, list[float]], floor: float) -> dict[str, float]:
        """Mean cosine to each adapter's `support_k` nearest texts; a text beyond the search's results counts as
        the search's last cosine (`floor`), which is at least the text's own."""
        k = self.config.support_k
        return {name: (sum(sims) + floor * (k - len(sims))) / k for name, sims in row.items()}

    def _searched(self):
        """The index searches go to: the CPU index, or its GPU copy (retaken after an add or a removal)."""
        if self._gpu is None:
            return self._index
        if self._search_copy is None:
            self._search_copy = fidx.gpu_search_copy(self._index, self._gpu) or self._index
        return self._search_copy

    def candidates(self, feats: np.ndarray) -> list[dict[str, float]]:
        """Per input: the neighbours near enough (`candidate_min_cos`) for their gate to be scored."""
        return [self._near_enough(near) for near in self.neighbours(feats)]

    def _near_enough(self, near: dict[str, float]) -> dict[str, float]:
        return {n: c for n, c in near.items() if c >= self.config.candidate_min_cos}

    def _gate_weights(self, feats: np.ndarray, near: list[dict[str, float]]) -> list[dict[str, float]]:
        """Per input: every candidate's gate weight (one scoring call per adapter for the whole batch)."""
        weights: list[dict[str, float]] = [{} for _ in range(len(feats))]
        by_adapter: dict[str, list[int]] = {}
        for i, c in enumerate(near):
            for name in self._near_enough(c):
                by_adapter.setdefault(name, []).append(i)
        with self._lock:
            for name, rows in by_adapter.items():
                gate = self.gates.get(name)
                if gate is None:  # removed between the search and now
                    continue
                for i, w in zip(rows, gate.weight(feats[rows]), strict=True):
                    weights[i][name] = float(w)
        return weights

    def _applied(self, near: dict[str, float], weights: dict[str, float],
                 support: dict[str, float]) -> dict[str, float]:
        """One input's decision: the requests that named this very text, at weight 1; and gates at or above
        `min_weight` whose request is `margin` nearer than every near request whose gate stays off, and which the
        input is a near-copy of or has the support of (module docstring)."""
        cfg = self.config
        exact = {n for n, c in near.items() if c >= EXACT_COS}
        firing = {n: w for n, w in weights.items() if w >= cfg.min_weight or n in exact}
        silent = max((c for n, c in near.items() if n not in firing), default=-np.inf)
        applied = {n: w for n, w in firing.items() if near[n] >= silent + cfg.margin
                   and (near[n] >= cfg.near_copy_cos or support.get(n, 0.0) >= cfg.min_support)}
        return applied | dict.fromkeys(exact, 1.0)

    def _decide(self, feats: np.ndarray) -> tuple[list[dict[str, float]], list[dict[str, float]],
                                                  list[dict[str, float]], list[dict[str, float]]]:
        """Per input: nearest cosine, support and gate weight of each candidate, and the applied adapters."""
        nearest = self._nearest(feats)
        near = [{name: sims[0] for name, sims in row.items()} for row, _ in nearest]
        weights = self._gate_weights(feats, near)
        support = [self._support(row, last) for row, last in nearest]
        applied = [self._applied(n, w, s) for n, w, s in zip(near, weights, support, strict=True)]
        return near, support, weights, applied

    def route_features(self, feats: np.ndarray) -> list[dict[str, float]]:
        return self._decide(feats)[3]

    def route(self, texts: list[str]) -> list[dict[str, float]]:
        """Per input: {adapter_id: gate weight} of the adapters to apply (empty: the base model as it was). With no
        adapter to route to, nothing is encoded: until the first forget request, serving costs what the base model
        costs."""
        if not self.gates:
            return [{} for _ in texts]
        return self.route_features(self.encoder.encode(list(texts)))

    def route_requests(self, requests: list[list[str]]) -> list[dict[str, float]]:
        """Serving requests that the router sees as several texts each (detector.inputs: every turn, and the last
        user turn in its context): per request, every adapter any of its texts routes to, at its highest gate weight.
        One encoder pass for all of them."""
        flat = [t for texts in requests for t in texts]
        routes = iter(self.route(flat) if flat else [])
        out = []
        for texts in requests:
            union: dict[str, float] = {}
            for route in (next(routes) for _ in texts):
                for name, w in route.items():
                    union[name] = max(w, union.get(name, 0.0))
            out.append(union)
        return out

    def explain(self, text: str) -> dict:
        """Every candidate's scores for one input: what `unlearnd route "text"` prints."""
        feats = self.encoder.encode([text])
        near, support, _, decided = self._decide(feats)
        applied = decided[0]
        cands = self._near_enough(near[0])
        rows = []
        with self._lock:
            for name, cos in sorted(cands.items(), key=lambda kv: -kv[1]):
                gate = self.gates[name]
                layer_scores = gate.layer_scores(feats)[0]
                z = float(gate.z_of_scores(layer_scores[None])[0])
                w = float(gate.calibration.weight(z))
                rows.append({"adapter_id": name, "nearest_cos": round(cos, 4),
                             "support": round(support[0].get(name, 0.0), 4), "layer_scores":
                             [round(float(s), 2) for s in layer_scores], "z": round(z, 4),
                             "confidence": round(float(gate.calibration.confidence(z)), 4), "weight": round(w, 4),
                             "applied": name in applied})
        return {"text_chars": len(text), "adapters_known": len(self.gates), "candidates": rows,
                "applied": {r["adapter_id"]: r["weight"] for r in rows if r["applied"]}}
