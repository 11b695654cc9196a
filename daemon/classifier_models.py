"""The classifier model kind in the daemon: bootstrap, targets and versions of image classifiers.

ModelRegistry (daemon/models.py) hands models of kind "classifier" to this strategy. What it keeps in the
artifact store, per model: the registered training rows (`dataset/registered`, stable ids that requests name)
and the versions (`versions/vNNNN/model.safetensors`; the architecture in the ledger's `info`). Every change is a
new version; rollback makes an earlier one the head again.

Weights and the rows an engine reads live on the model's `device` (models.<name>.device); the files are the same
whatever the device. Classifiers train and unlearn in float32 (`dtypes`).
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters import datasets
from adapters.base import Change
from adapters.classifier import model as classifier
from adapters.devices import resolve_device
from daemon.config import Model
from daemon.ledger import ArtifactRow
from daemon.model_kind import DATASET_ID, ModelKind

if TYPE_CHECKING:
    from daemon.models import ModelRegistry

log = logging.getLogger("daemon.models")  # the registry's log: bootstrap lines read as they always have


class ClassifierModels(ModelKind):
    """Per-kind strategy of ModelRegistry for classifiers."""

    def __init__(self, registry: ModelRegistry):
        super().__init__(registry)
        self._cache: dict[str, tuple[str, classifier.ClassifierTarget]] = {}  # model -> (head id, target)

    # A classifier's engines step its weights themselves (IAU one calibrated Adam step, SalUn SGD): a bfloat16
    # weight cannot hold a change below 0.4 % of its value (8 bits of mantissa), so most of such a step would
    # round away. Its gradient sums (IAU's cache subtracts the forget rows' share from them) need float32 too.
    dtypes = ("float32",)

    # --- bootstrap ------------------------------------------------------------------------------------------

    def bootstrap(self, name: str, spec: Model, *, progress: bool = True,
                  stop: threading.Event | None = None) -> ArtifactRow | None:
        """Train and record the model's first version (bootstrap.recipe = "classifier") if the ledger has none."""
        head = self.ledger.head(name)
        if head is not None:
            return head
        if spec.bootstrap.recipe != "classifier":
            raise RuntimeError(f"model {name!r} has no version yet and bootstrap.recipe = {spec.bootstrap.recipe!r} "
                               "cannot build one")
        b = spec.bootstrap
        split = datasets.DATASETS[b.dataset](seed=b.seed)
        self.store.publish(name, "dataset", DATASET_ID, split.save,
                           {"dataset": b.dataset, "num_classes": split.num_classes,
                            "input_shape": list(split.input_shape), "train_rows": len(split.train),
                            "test_rows": len(split.test)})
        arch = {"arch": b.arch, "input_shape": list(split.input_shape), "hidden": list(b.hidden),
                "num_classes": split.num_classes, "init_seed": b.seed}
        module = classifier.build(arch).to(resolve_device(spec.device))
        log.info("bootstrapping %s: training a %s on %d %s samples (%d epochs, gradient restriction alpha=%g)",
                 name, b.arch, len(split.train), b.dataset, b.epochs, b.gr_alpha)
        from tqdm import tqdm

        with tqdm(total=b.epochs, desc=f"training {name}", unit="epoch", disable=not progress, file=sys.stderr) as bar:
            def on_epoch(epoch: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)

            classifier.train_gr(module, split.train, epochs=b.epochs, alpha=b.gr_alpha, seed=b.seed, on_epoch=on_epoch)
        from adapters.classifier import measures

        metrics = {"train_acc": measures.accuracy(module, split.train),
                   "test_acc": measures.accuracy(module, split.test)}
        version = self.ledger.allocate_id(name, "version")
        change = classifier.WeightChange(classifier.state_of(module), metrics)
        art = self.store.publish(name, "versions", version, change.save,
                                 {"spec": arch, "parent": None, "metrics": metrics})
        self.ledger.add_artifact(name, version, "version", parent=None, request_id=None, path=str(art.path),
                                 sha256=art.sha256, metrics=metrics, info={"spec": arch})
        log.info("registered %s %s (test accuracy %.3f)", name, version, metrics["test_acc"])
        return self.ledger.head(name)

    # --- targets --------------------------------------------------------------------------------------------

    def target(self, name: str) -> classifier.ClassifierTarget:
        """The ClassifierTarget of the head, cached until the head moves (the registered rows are kept)."""
        head = self.ledger.head(name)
        if head is None:
            raise RuntimeError(f"model {name!r} has no version; start the daemon once to bootstrap it")
        cached = self._cache.get(name)
        if cached and cached[0] == head.id:
            return cached[1]
        meta = self.store.meta(name, "dataset", DATASET_ID)
        data = cached[1].data if cached else datasets.Split.load(
            self.store.path(name, "dataset", DATASET_ID), meta["num_classes"], tuple(meta["input_shape"]))
        target = self._target_of(name, head, data)
        self._cache[name] = (head.id, target)
        return target

    def lineage_start(self, name: str) -> classifier.ClassifierTarget | None:
        """The head's lineage's first version (its parent-less ancestor), loaded as a target of its own."""
        head = self.target(name)
        first = self.ledger.lineage(name, head.version)[-1]
        return None if first.id == head.version else self._target_of(name, first, head.data)

    def _target_of(self, name: str, version: ArtifactRow, data: datasets.Split) -> classifier.ClassifierTarget:
        arch = version.info["spec"]
        device = resolve_device(self.registry.spec(name).device)
        return classifier.ClassifierTarget(name=name, version=version.id, spec=arch,
                                           model=classifier.load_weights(arch, Path(version.path), device), data=data,
                                           forgotten=self.ledger.forgotten_ids(name, version.id))

    def after_commit(self, name: str, change: Change, target: Any, artifact_id: str) -> None:
        """Keep the in-memory target in step with a version made here; a staged one is loaded by the next request."""
        if isinstance(change, classifier.WeightChange):
            self._cache[name] = (artifact_id, classifier.ClassifierTarget(
                name=name, version=artifact_id, spec=target.spec, model=change.module(target.spec), data=target.data,
                forgotten=target.forgotten | frozenset(change.forgotten_ids)))

    def on_rollback(self, name: str) -> None:
        self._cache.pop(name, None)
