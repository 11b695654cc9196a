"""Registered models: how each is bootstrapped, loaded as an engine target, changed and rolled back.

The ledger says which artifact is active; the artifact store holds the files. This module joins the two for
the daemon and the CLI: `target()` builds what an engine needs, `commit()` makes a change durable (files
first, then one ledger transaction), `rollback()` restores an earlier state exactly.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters import datasets
from adapters.classifier import model as classifier
from adapters.base import Change, Engine, Forget, InvalidForget, config_from_mapping, engine_class
from adapters.devices import device_of
from adapters.store import ArtifactStore
from daemon import failpoints
from daemon.config import FORGET_KINDS, Config, ConfigError, Model
from daemon.diffusion_models import DiffusionModels
from daemon.ledger import ArtifactRow, Ledger

log = logging.getLogger(__name__)

DATASET_ID = "registered"
GATE_SUBDIR = "gate"  # where an O3 adapter keeps its detector state (= detector.routed_model.GATE_SUBDIR)


class UnknownModel(KeyError):
    def __str__(self) -> str:  # KeyError's own str() quotes its message, which already quotes the name
        return str(self.args[0])


@dataclass
class Committed:
    artifact_id: str
    kind: str
    path: Path
    sha256: str


class ModelRegistry:
    def __init__(self, config: Config, store: ArtifactStore, ledger: Ledger):
        self.config = config
        self.store = store
        self.ledger = ledger
        self._engines: dict[tuple[str, str], Engine] = {}  # (model, method) -> engine
        self._cache: dict[str, tuple[str, classifier.ClassifierTarget]] = {}  # model -> (head id, target)
        self._lm_targets: dict = {}  # model -> adapters.lm.o3.LMTarget (holds the loaded base model)
        self._encoder = None  # detector.Encoder, loaded on the first adapter
        self._kinds = {"diffusion": DiffusionModels(self)}  # model kinds whose handling lives in a strategy

    # --- lookup ---------------------------------------------------------------------------------------------

    def spec(self, name: str) -> Model:
        try:
            return self.config.models[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; registered: {sorted(self.config.models)}") from None

    def method_for(self, name: str, requested: str | None, forget_kind: str | None = None) -> str:
        """The method named by the request, else the model's default for this kind of forget request."""
        return requested or self.spec(name).default_method(forget_kind)

    def check_methods(self) -> None:
        """Start-up check: every model's default methods are engines for its kind (raises ConfigError). Not run
        by CLI commands that build a registry, since it imports every engine named (an LM engine imports peft)."""
        for name, spec in self.config.models.items():
            for forget_kind in (None, *spec.method_by_forget):
                method = spec.default_method(forget_kind)
                where = f"method_by_forget.{forget_kind}" if forget_kind else "method"
                try:
                    self.engine(method, name)  # the engine exists for the kind and its settings are known keys
                except KeyError:
                    raise ConfigError(f"models.{name}.{where}: method {method!r} does not apply to {spec.kind} "
                                      "models") from None
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"models.{name}: {exc}") from None
            strategy = self._kinds.get(spec.kind)
            if strategy is not None:
                try:
                    strategy.check(name, spec)
                except ValueError as exc:
                    raise ConfigError(f"models.{name}.{exc}") from None

    def engine(self, method: str, model: str) -> Engine:
        """The engine of `method` for `model`'s kind, one instance per (model, method) for the daemon's lifetime
        (engines may keep caches). Settings: [methods.<method>] (its sub-table named after the kind, for a method
        whose first kind is another), then [models.<model>.methods.<method>]. KeyError if it does not apply."""
        key = (model, method)
        if key not in self._engines:
            spec = self.spec(model)
            cls = engine_class(method, spec.kind)
            self._engines[key] = cls(config_from_mapping(cls, self.engine_settings(method, spec)))
        return self._engines[key]

    def engine_settings(self, method: str, spec: Model) -> dict:
        table = dict(self.config.methods.get(method, {}))
        per_kind = {k: table.pop(k) for k in list(table) if k in FORGET_KINDS}  # sub-tables named after a kind
        own = table if engine_class(method) is engine_class(method, spec.kind) else {}
        return {**own, **per_kind.get(spec.kind, {}), **spec.methods.get(method, {})}

    def check_ready(self, name: str) -> None:
        """Raises a transient ModelNotReady while a model's first version is still being built in the background."""
        strategy = self._kinds.get(self.spec(name).kind)
        if strategy is not None:
            strategy.check_ready(name)

    def precheck(self, name: str, forget: Forget) -> None:
        """A cheap check before a request waits for its model (raises InvalidForget), for kinds that have one."""
        strategy = self._kinds.get(self.spec(name).kind)
        if strategy is not None:
            strategy.precheck(name, forget)

    # --- bootstrap ------------------------------------------------------------------------------------------

    def lm_base(self, name: str) -> Path:
        """A causal LM's base weights: a transformers directory, or the bundled SmolLM2 GGUF converted once
        into the model's store folder (safetensors)."""
        from adapters.lm import loading as lm

        return lm.resolve_source(self.spec(name).bootstrap.source or "smollm2", self.store.root / name)

    def bootstraps_later(self, name: str) -> bool:
        """Whether the model has no version yet and is built in the background once the daemon consumes."""
        spec = self.spec(name)
        return spec.bootstraps_in_background and spec.kind != "causal_lm" and self.ledger.head(name) is None

    def kind_strategy(self, name: str):
        """The per-kind strategy of a model (e.g. DiffusionModels), or None for kinds handled here."""
        return self._kinds.get(self.spec(name).kind)

    def ensure_bootstrapped(self, name: str, progress: bool = True,
                            stop: threading.Event | None = None) -> ArtifactRow | None:
        """Build the model's first version if the ledger has none (first start); later starts reuse it."""
        spec = self.spec(name)
        if spec.kind == "causal_lm":  # adapters stack on an unchanged base: convert/locate it, no version
            self.lm_base(name)
            return self.ledger.head(name)
        head = self.ledger.head(name)
        if head is not None:
            return head
        strategy = self._kinds.get(spec.kind)
        if strategy is not None:
            return strategy.bootstrap(name, spec, stop=stop)
        if spec.bootstrap.recipe == "classifier":
            return self._bootstrap_classifier(name, spec, progress)
        raise RuntimeError(f"model {name!r} has no version yet and bootstrap.recipe = {spec.bootstrap.recipe!r} "
                           "cannot build one")

    def _bootstrap_classifier(self, name: str, spec: Model, progress: bool) -> ArtifactRow:
        b = spec.bootstrap
        split = datasets.DATASETS[b.dataset](seed=b.seed)
        self.store.publish(name, "dataset", DATASET_ID, split.save,
                           {"dataset": b.dataset, "num_classes": split.num_classes,
                            "input_shape": list(split.input_shape), "train_rows": len(split.train),
                            "test_rows": len(split.test)})
        arch = {"arch": b.arch, "input_shape": list(split.input_shape), "hidden": list(b.hidden),
                "num_classes": split.num_classes, "init_seed": b.seed}
        module = classifier.build(arch)
        log.info("bootstrapping %s: training a %s on %d %s samples (%d epochs, gradient restriction alpha=%g)",
                 name, b.arch, len(split.train), b.dataset, b.epochs, b.gr_alpha)
        from tqdm import tqdm

        with tqdm(total=b.epochs, desc=f"training {name}", unit="epoch", disable=not progress, file=sys.stderr) as bar:
            def on_epoch(epoch: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)

            classifier.train_gr(module, split.train, epochs=b.epochs, alpha=b.gr_alpha, seed=b.seed, on_epoch=on_epoch)
        from adapters.classifier import measures

        metrics = {"train_acc": measures.accuracy(module, split.train), "test_acc": measures.accuracy(module, split.test)}
        version = self.ledger.next_id(name, "version")
        change = classifier.WeightChange(classifier.state_of(module), metrics)
        art = self.store.publish(name, "versions", version, change.save, {"spec": arch, "parent": None, "metrics": metrics})
        self.ledger.add_artifact(name, version, "version", parent=None, request_id=None, path=str(art.path),
                                 sha256=art.sha256, metrics=metrics, info={"spec": arch})
        log.info("registered %s %s (test accuracy %.3f)", name, version, metrics["test_acc"])
        return self.ledger.head(name)

    # --- targets --------------------------------------------------------------------------------------------

    def target(self, name: str):
        """What an engine needs to apply a request to this model as it is now."""
        spec = self.spec(name)
        if spec.kind == "causal_lm":
            return self._lm_target(name)
        if spec.kind in self._kinds:
            return self._kinds[spec.kind].target(name)
        head = self.ledger.head(name)
        if head is None:
            raise RuntimeError(f"model {name!r} has no version; start the daemon once to bootstrap it")
        cached = self._cache.get(name)
        if cached and cached[0] == head.id:
            return cached[1]
        meta = self.store.meta(name, "dataset", DATASET_ID)
        data = cached[1].data if cached else datasets.Split.load(
            self.store.path(name, "dataset", DATASET_ID), meta["num_classes"], tuple(meta["input_shape"]))
        arch = head.info["spec"]
        target = classifier.ClassifierTarget(name=name, version=head.id, spec=arch,
                                             model=classifier.load_weights(arch, Path(head.path)), data=data,
                                             forgotten=self.ledger.forgotten_ids(name, head.id))
        self._cache[name] = (head.id, target)
        return target

    def _lm_target(self, name: str):
        from adapters.lm.o3 import LMTarget

        spec = self.spec(name)
        target = self._lm_targets.get(name) or LMTarget(name=name, base_dir=self.lm_base(name), device=spec.device,
                                                        dtype=spec.dtype)
        target.adapters = {a.id: Path(a.path) for a in self.ledger.list_artifacts(name, "adapter") if a.active}
        self._lm_targets[name] = target  # keeps the loaded base model across requests
        return target

    def encoder(self, device: str = "cpu"):
        """The router's shared frozen encoder (detector.Encoder), loaded on the first adapter, on `device` (the
        device of the model it first routes for)."""
        if self._encoder is None:
            from detector import Encoder

            self._encoder = Encoder(device=device)
        return self._encoder

    def artifact_writer(self, change: Change, artifact_id: str, target) -> Callable[[Path], None]:
        """An adapter's files plus its O3 gate (detector state fitted on `adapters.lm.o3.gate_texts`), in one atomic
        publish; then the result measures, through the router as serving will route (adapters/lm/measures.py).
        The texts themselves are never written; the gate keeps features only."""
        forget_texts = getattr(change, "forget_texts", None)
        if not forget_texts:
            return change.save

        def save(directory: Path) -> None:
            from detector import fit_request_gate
            from detector.gate import UnsoundGate

            change.save(directory)
            try:
                fitted = fit_request_gate(forget_texts, directory / GATE_SUBDIR, self.encoder(str(device_of(target.model))),
                                          adapter_id=artifact_id)
            except UnsoundGate as exc:
                raise InvalidForget(str(exc)) from None
            change.metrics.update({f"gate_{k}": float(v) for k, v in fitted.items() if isinstance(v, (int, float))})
            items = getattr(change, "measure_items", None)
            if items is not None:
                change.metrics.update(self._served_measures(target, directory, artifact_id, items))

        return save

    def _served_measures(self, target, adapter_dir: Path, artifact_id: str, items) -> dict[str, float]:
        """The result event's forgetting measures: the new adapter and every active one routable, as in serving."""
        from adapters.lm.measures import served_measures
        from detector import RoutedModel

        routed = RoutedModel(target.model, target.tokenizer, new_router(self.config, self.encoder(str(device_of(target.model)))))
        try:
            for aid, path in target.adapters.items():
                if (Path(path) / GATE_SUBDIR / "gate.json").is_file():
                    routed.add_adapter(aid, path, lazy=True)
            routed.add_adapter(artifact_id, adapter_dir, lazy=True)
            return served_measures(routed, artifact_id, items)
        except Exception:  # a measure must never cost the request its adapter: it is reported, not required
            log.exception("result measures of %s failed; the adapter is applied without them", artifact_id)
            return {}
        finally:
            routed.release()  # LoRA layers out: the shared base model is exactly as it was

    def commit(self, name: str, change: Change, *, target, request_ids: list[str],
               finish: Callable[[str], None]) -> Committed:
        """Make a change durable: files first (atomic publish), then ONE ledger transaction that records the
        artifact, activates it, and runs `finish(artifact_id)` (the caller marks its requests applied there).
        A crash between the two leaves an orphan directory that a retry overwrites; nothing is applied twice."""
        parent = getattr(target, "version", None)
        if change.kind == "version":
            change.info.setdefault("spec", target.spec)
        folder = "versions" if change.kind == "version" else "adapters"
        artifact_id = self.ledger.next_id(name, change.kind)
        meta = {"parent": parent, "request_ids": request_ids, "metrics": change.metrics, **change.info}
        try:
            art = self.store.publish(name, folder, artifact_id, self.artifact_writer(change, artifact_id, target), meta)
        finally:
            if hasattr(change, "forget_texts"):  # raw forget data leaves memory with the request
                change.forget_texts, change.measure_items = [], None
        failpoints.hit("after_artifact")
        with self.ledger.transaction():
            self.ledger.add_artifact(name, artifact_id, change.kind, parent=parent, request_id=request_ids[0],
                                     path=str(art.path), sha256=art.sha256, metrics=change.metrics,
                                     info=change.info, forgotten_ids=change.forgotten_ids)
            finish(artifact_id)
        strategy = self._kinds.get(self.spec(name).kind)
        if strategy is not None:
            strategy.committed(name, change, target, artifact_id)
        elif isinstance(change, classifier.WeightChange):  # keep the in-memory target in step: no reload
            self._cache[name] = (artifact_id, classifier.ClassifierTarget(
                name=name, version=artifact_id, spec=target.spec, model=change.module(target.spec), data=target.data,
                forgotten=target.forgotten | frozenset(change.forgotten_ids)))
        return Committed(artifact_id, change.kind, art.path, art.sha256)

    def set_adapter(self, name: str, adapter_id: str, active: bool, *, reason: str) -> ArtifactRow:
        """Rollback (active=False) or restore of one adapter; the base and other adapters are untouched."""
        row = self.ledger.get_artifact(name, adapter_id)
        if row is None or row.kind != "adapter":
            raise KeyError(f"{name} has no adapter {adapter_id}")
        if active and not self.store.verify(name, "adapters", adapter_id):
            raise RuntimeError(f"{name} {adapter_id}: files on disk no longer match their recorded sha256")
        return self.ledger.set_adapter_active(name, adapter_id, active, reason=reason)

    # --- rollback -------------------------------------------------------------------------------------------

    def rollback(self, name: str, to_version: str, *, reason: str) -> ArtifactRow:
        """Make an earlier version the head. Its file is the one written at the time, so weights are bit-exact."""
        row = self.ledger.get_artifact(name, to_version)
        if row is None or row.kind != "version":
            raise KeyError(f"{name} has no version {to_version}")
        if not self.store.verify(name, "versions", to_version):
            raise RuntimeError(f"{name} {to_version}: files on disk no longer match their recorded sha256")
        row = self.ledger.set_head(name, to_version, reason=reason)
        self._cache.pop(name, None)
        for strategy in self._kinds.values():
            strategy.forget_cache(name)
        for engine in self._engines.values():
            if hasattr(engine, "forget_cache"):
                engine.forget_cache(name)
        return row


def new_router(config: Config, encoder):
    """The router `unlearnd serve` runs, with [serve]'s settings; the daemon's result measures route with it too."""
    from detector import Router, RouterConfig

    return Router(encoder, RouterConfig(min_weight=config.serve.min_weight, margin=config.serve.margin))
