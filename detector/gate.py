"""One request's gate: O3's OOD detector fitted on that request's forget features only.

Per gate layer l (see GATE_LAYERS), for features f of an input:
    s_l(f) = -0.5 (f - mu_l)^T Prec_l (f - mu_l)  -  1000 (1 - max_{f' in bank_l} cos(f, f'))
The global term is the Gaussian of D_used (gaussian.py); the local term is a 1-NN search of the request's
own FAISS bank (index.py): D_used while the gate is fitted and calibrated, then D_used + D_rest.
ALGORITHMS.md writes the local term as `-1000 max cos`; we use the cosine *distance* so both terms grow towards
the forget data (as in KNN-OOD, which O3's local term comes from); with `-1000 max cos` a verbatim forget sample
would look the least forget-like.
Each layer score (<= 0) is mapped to `u_l = T_l / (T_l - s_l)` in (0, 1], T_l the median |s_l| over D_used:
"infinitely far" sits at the origin, which is what a linear one-class SVM separates its data from, and the
map never saturates (held-out paraphrases and unrelated inputs stay ordered). The SVM's decision value is z; the
two-Gaussian calibration (calibration.py) turns z into the soft weight w. Its held-out side is D_rest plus
leave-one-out scores of D_used (O3: D_rest alone, 2-4 samples for a typical request; see _leave_one_out_z).

Which layers: O3 aggregates every layer; by default we score only the encoder's last layer (MiniLM's sentence
embedding). The lower layers are lexical: they see a shared question template more than the person it asks about,
so look-alike questions about other people score high there, and because every request's gate errs on its own,
those false activations add up with the number of requests. The last layer separates held-out paraphrases from
look-alikes better at almost the same recall (bench/router.py, "gate_layers"; figures in the README).
`layers` is a fit parameter and is persisted, so a gate is always scored on the layers it was fit on.

Persisted next to the adapter (no pickle): `gate.safetensors` (arrays, including the linear SVM's coef_ and
intercept_), `gate.json` (scalars, calibration, metrics), `bank_l{l}.faiss` (faiss.write_index). The raw forget
text is never written: only its features, which are what the detector needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.svm import OneClassSVM

from detector import index as fidx
from detector.calibration import TwoGaussianCalibration
from detector.gaussian import LowRankGaussian

FORMAT_VERSION = 2  # 2: `layers` (format 1 gates used every layer, and still load)
# Distinct texts a gate needs: 80/20 leaves >= 3 to fit on, and each leave-one-out refit (the calibration's
# held-out side) still has 2 samples for its Gaussian; with fewer, the spread is 0 and the calibration NaN.
MIN_GATE_TEXTS = 4
LOCAL_SCALE = 1000.0
GATE_LAYERS: tuple[int, ...] = (-1,)  # encoder layers a gate scores by default; negative = from the top
LOO_SAMPLES = 64  # leave-one-out refits per gate for the calibration (a 1-D spread needs no more)
GATE_SUBDIR = "gate"  # an adapter directory keeps its gate here, hashed and versioned with it


class UnsoundGate(ValueError):
    """A request's texts cannot give a sound gate (too few distinct texts, degenerate features)."""


@dataclass
class RequestGate:
    adapter_id: str
    gaussians: list[LowRankGaussian]
    banks: list[faiss.IndexIDMap2]  # per layer, this request's D_used features (normalised)
    score_scale: np.ndarray  # [L] T_l: typical |s_l| of the request's own data
    svm_coef: np.ndarray  # [L] linear one-class SVM
    svm_intercept: float
    calibration: TwoGaussianCalibration
    info: dict = field(default_factory=dict)
    layers: tuple[int, ...] = ()  # the encoder layers (absolute indices) of gaussians/banks, in order

    def __post_init__(self):
        if not self.layers:
            self.layers = tuple(range(len(self.gaussians)))
        if len(self.layers) != len(self.gaussians):
            raise ValueError(f"{len(self.layers)} layers for {len(self.gaussians)} gaussians")

    @property
    def key(self) -> int:
        return fidx.request_key(self.adapter_id)

    @property
    def n_layers(self) -> int:
        return len(self.gaussians)

    def bank_of_layer(self, layer: int, n_encoder_layers: int) -> faiss.IndexIDMap2:
        """This request's vectors of encoder layer `layer` (negative = from the top): what the router indexes."""
        absolute = layer % n_encoder_layers
        if absolute not in self.layers:
            raise ValueError(f"gate {self.adapter_id!r} was fit on layers {list(self.layers)}, not {absolute}")
        return self.banks[self.layers.index(absolute)]

    # --- scoring -----------------------------------------------------------------------------------
    def layer_scores(self, feats: np.ndarray, *, exclude_rows: np.ndarray | None = None,
                     gaussians: list[LowRankGaussian] | None = None) -> np.ndarray:
        """[n, L] glocal scores of encoder features [n, all layers, d] on the gate's L layers.
        `exclude_rows[i]` = bank row of input i itself, `gaussians` = refits without it (leave-one-out while
        fitting)."""
        n = len(feats)
        out = np.empty((n, self.n_layers), np.float64)
        k = 2 if exclude_rows is not None else 1
        for layer, (gauss, bank, f_layer) in enumerate(
            zip(gaussians or self.gaussians, self.banks, self.layers, strict=True)
        ):
            f = feats[:, f_layer, :]
            sims, ids = bank.search(fidx.normalise(f), min(k, bank.ntotal))
            if exclude_rows is None:
                nearest = sims[:, 0]
            else:
                own = (np.int64(self.key) << fidx.ROW_BITS) + exclude_rows
                nearest = np.where(ids[:, 0] == own, sims[:, -1], sims[:, 0])
            out[:, layer] = -0.5 * gauss.mahalanobis_sq(f) - LOCAL_SCALE * (1.0 - nearest)
        return out

    def svm_inputs(self, scores: np.ndarray) -> np.ndarray:
        return self.score_scale / (self.score_scale - np.minimum(scores, 0.0))

    def z_of_scores(self, scores: np.ndarray) -> np.ndarray:
        """The one-class SVM's decision value for [n, L] layer scores."""
        return self.svm_inputs(scores) @ self.svm_coef + self.svm_intercept

    def z(self, feats: np.ndarray, **kw) -> np.ndarray:
        return self.z_of_scores(self.layer_scores(feats, **kw))

    def weight(self, feats: np.ndarray) -> np.ndarray:
        return self.calibration.weight(self.z(feats))

    # --- persistence -------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"score_scale": self.score_scale, "svm_coef": self.svm_coef,
                  "svm_intercept": np.array([self.svm_intercept])}
        for layer, g in enumerate(self.gaussians):
            arrays |= {f"l{layer}.mean": g.mean, f"l{layer}.basis": g.basis, f"l{layer}.gain": g.gain}
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, str(out_dir / "gate.safetensors")
        )
        for layer, bank in zip(self.layers, self.banks, strict=True):  # named by encoder layer
            fidx.write(bank, out_dir / f"bank_l{layer}.faiss")
        scalars = {
            "format_version": FORMAT_VERSION, "adapter_id": self.adapter_id, "key": self.key,
            "n_layers": self.n_layers, "layers": list(self.layers), "calibration": self.calibration.to_json(),
            "gaussians": [{"iso": g.iso, "shrinkage": g.shrinkage} for g in self.gaussians], **self.info,
        }
        (out_dir / "gate.json").write_text(json.dumps(scalars, indent=2))

    @classmethod
    def load(cls, gate_dir: Path) -> RequestGate:
        gate_dir = Path(gate_dir)
        meta = json.loads((gate_dir / "gate.json").read_text())
        if meta.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(f"{gate_dir}: gate format {meta.get('format_version')} != {FORMAT_VERSION}")
        a = load_file(str(gate_dir / "gate.safetensors"))
        gaussians = [LowRankGaussian(a[f"l{i}.mean"], a[f"l{i}.basis"], a[f"l{i}.gain"], g["iso"], g["shrinkage"])
                     for i, g in enumerate(meta["gaussians"])]
        layers = tuple(meta.get("layers", range(meta["n_layers"])))
        banks = [fidx.read(gate_dir / f"bank_l{i}.faiss") for i in layers]
        info = {k: v for k, v in meta.items() if k not in
                ("format_version", "adapter_id", "key", "n_layers", "layers", "calibration", "gaussians")}
        return cls(
            meta["adapter_id"],
            gaussians,
            banks,
            a["score_scale"].astype(np.float64),
            a["svm_coef"].astype(np.float64),
            float(a["svm_intercept"][0]),
            TwoGaussianCalibration(**meta["calibration"]),
            info,
            layers,
        )


def has_gate(adapter_dir: str | Path) -> bool:
    """Whether an adapter directory holds a gate (`GATE_SUBDIR`), i.e. whether serving can route to it."""
    return (Path(adapter_dir) / GATE_SUBDIR / "gate.json").is_file()


def split_used_rest(n: int, *, used_fraction: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """O3's 80/20 split of one request's forget set: fit on D_used, calibrate on D_rest."""
    order = np.random.default_rng(seed).permutation(n)
    n_used = n if n < 2 else min(n - 1, max(1, int(round(used_fraction * n))))
    return np.sort(order[:n_used]), np.sort(order[n_used:])


def fit_gate_from_features(feats: np.ndarray, adapter_id: str, *, layers: tuple[int, ...] | None = GATE_LAYERS,
                           nu: float = 0.1, seed: int = 0, encoder_name: str = "",
                           leave_one_out: bool = True) -> RequestGate:
    """Fit a gate on one request's encoder features [n, all layers, d], scoring `layers` (None: all). Raises
    UnsoundGate for fewer than MIN_GATE_TEXTS distinct inputs or a degenerate fit: never a NaN gate.
    `leave_one_out=False` calibrates on D_rest alone, as O3 does (kept for the benchmark's comparison)."""
    distinct = len(np.unique(np.round(feats[:, -1, :], 5), axis=0))
    if distinct < MIN_GATE_TEXTS:
        raise UnsoundGate(f"a gate needs at least {MIN_GATE_TEXTS} texts with distinct features, got {distinct}")
    t0 = time.perf_counter()
    n_enc = feats.shape[1]
    layers = tuple(range(n_enc)) if layers is None else tuple(sorted({int(x) % n_enc for x in layers}))
    used, rest = split_used_rest(len(feats), seed=seed)
    key = fidx.request_key(adapter_id)
    gaussians, banks = [], []
    for layer in layers:
        gaussians.append(LowRankGaussian.fit(feats[used, layer]))
        bank = fidx.new_index(feats.shape[2])
        fidx.add_request(bank, key, fidx.normalise(feats[used, layer]))
        banks.append(bank)
    gate = RequestGate(adapter_id, gaussians, banks, np.ones(len(layers)), np.zeros(len(layers)), 0.0,
                       TwoGaussianCalibration(0.0, 1.0, 0.0, 1.0), layers=layers)
    s_used = gate.layer_scores(feats[used], exclude_rows=np.arange(len(used)))
    gate.score_scale = np.maximum(np.median(-s_used, axis=0), 1e-6)
    u_used = gate.svm_inputs(s_used)
    svm = OneClassSVM(kernel="linear", nu=nu).fit(u_used)
    gate.svm_coef = svm.coef_.ravel().astype(np.float64)
    gate.svm_intercept = float(svm.intercept_[0])
    # Our z must be the SVM's own decision value, or the persisted coef_/intercept_ would not reproduce it.
    assert np.allclose(u_used @ gate.svm_coef + gate.svm_intercept, svm.decision_function(u_used), atol=1e-6)
    # D_rest joins the local banks (not the Gaussians), so every text the request named is its own nearest
    # neighbour and always routes (held out, some of them fell below min_weight: bench/router.py). The
    # calibration below scores against these final banks, each sample skipping its own row.
    for bank, layer in zip(gate.banks, layers, strict=True):
        fidx.add_request(bank, key, fidx.normalise(feats[rest, layer]), first_row=len(used))
    z_used = gate.z(feats[used], exclude_rows=np.arange(len(used)))
    z_rest = gate.z(feats[rest], exclude_rows=len(used) + np.arange(len(rest))) if len(rest) else z_used
    z_held = np.r_[z_rest, _leave_one_out_z(gate, feats, used, seed)] if leave_one_out else z_rest
    gate.calibration = TwoGaussianCalibration.fit(z_used, z_held)
    numbers = np.r_[gate.score_scale, gate.svm_coef, gate.svm_intercept, list(gate.calibration.to_json().values())]
    if not np.all(np.isfinite(numbers)):
        raise UnsoundGate("the request's texts gave a degenerate gate (non-finite scores); send more distinct texts")
    w_rest = gate.calibration.weight(z_rest)
    gate.info = {
        "encoder": encoder_name, "n_used": int(len(used)), "n_rest": int(len(rest)), "nu": nu,
        "metrics": {"fit_seconds": round(time.perf_counter() - t0, 4), "z_used_mean": float(z_used.mean()),
                    "z_rest_mean": float(z_rest.mean()), "z_held_n": int(len(z_held)),
                    "weight_rest_mean": float(w_rest.mean()),
                    "weight_rest_min": float(w_rest.min())},
    }
    return gate


def _leave_one_out_z(gate: RequestGate, feats: np.ndarray, used: np.ndarray, seed: int) -> np.ndarray:
    """z of D_used samples as if each had been held out: the Gaussians refit without it, its own bank row
    skipped. The calibration's held-out side then rests on D_rest plus these (up to LOO_SAMPLES), not on D_rest
    alone, which is 2 samples for a 9-text request: too few to place the held-out side of a small request's
    calibration (bench/router.py "small_requests" measures what it changes)."""
    rows = np.arange(len(used))
    if len(rows) > LOO_SAMPLES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, LOO_SAMPLES, replace=False))
    z = np.empty(len(rows))
    for i, j in enumerate(rows):
        keep = np.delete(used, j)
        refit = [LowRankGaussian.fit(feats[keep, layer]) for layer in gate.layers]
        z[i] = gate.z(feats[used[j]:used[j] + 1], exclude_rows=np.array([j]), gaussians=refit)[0]
    return z


def fit_request_gate(texts: list[str], out_dir: Path, encoder, *, adapter_id: str,
                     layers: tuple[int, ...] | None = GATE_LAYERS, nu: float = 0.1, seed: int = 0) -> dict:
    """What an O3 adapter's change calls after training (adapters.lm.o3.AdapterChange.fit_gate): fit the request's
    gate and persist it in `out_dir`.

    `texts` are the request's forget inputs as users send them, `adapters.lm.o3.gate_texts(forget)`: the bare
    questions of `forget.qa` (the router sees the user's turn, not the prompt template: detector.inputs), the
    texts of `forget.texts`. They are encoded and dropped: only features reach the disk. `out_dir` is the adapter's own
    `GATE_SUBDIR` inside the staging directory the store publishes, so the gate is versioned (and hashed)
    with its adapter. Returns the gate's metrics (JSON-able) for the ledger and the result event.
    """
    gate = fit_gate_from_features(encoder.encode(list(texts)), adapter_id, layers=layers, nu=nu, seed=seed,
                                  encoder_name=getattr(encoder, "name", ""))
    gate.save(Path(out_dir))
    return dict(gate.info["metrics"], n_used=gate.info["n_used"], n_rest=gate.info["n_rest"])
