"""The diffusion model kind in the daemon: bootstrap, targets and pictures of class-conditional DDPMs.

ModelRegistry (daemon/models.py) hands models of kind "diffusion" to this strategy. What it keeps in the
artifact store, per model: the registered training rows (`dataset/registered`, stable ids, as for classifiers),
the judge that reads generated samples (`judge/judge`, fixed for the model's life so every request's before/after
figures are read by the same classifier), and the versions (`versions/vNNNN/model.safetensors`; the DDPM spec and
the version's recognition in the ledger's `info`). Rollback is the registry's, as for classifier versions.

A DDPM trains for minutes, so by default it is built in the background once the daemon is consuming
(models.<name>.bootstrap.when); until its first version exists, `target()` raises ModelNotReady, a transient
condition: the daemon pauses and retries the request, never fails or loses it (daemon/bootstrapping.py, shared
with the images kind).

The DDPM, its judge and the rows an engine reads live on the model's `device` (models.<name>.device); the files
are the same whatever the device. A DDPM trains and unlearns in float32 (`dtypes`, as for classifiers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from adapters.base import Change, Forget, InvalidForget
from adapters.devices import resolve_device
from daemon.bootstrapping import ModelNotReady, override, progress_logger
from daemon.config import Model
from daemon.ledger import ArtifactRow
from daemon.model_kind import DATASET_ID, ModelKind

if TYPE_CHECKING:  # torch-heavy: imported where used
    from adapters.diffusion.demo import DemoRecipe
    from adapters.diffusion.target import DiffusionTarget
    from daemon.models import ModelRegistry

log = logging.getLogger(__name__)

JUDGE = ("judge", "judge")  # (store folder, artifact id) of a model's judge


def recipe(spec: Model) -> DemoRecipe | None:
    """The demo recipe (adapters/diffusion/demo.py) with the model's [bootstrap] settings over its defaults.
    Raises ValueError naming a key the recipe does not know."""
    from adapters.diffusion import demo

    b = spec.bootstrap
    base = demo.DemoRecipe()
    return demo.DemoRecipe(dataset=b.dataset, seed=b.seed, spec=override(base.spec, b.ddpm, "ddpm"),
                           train=override(base.train, b.train, "train"), judge_epochs=b.judge_epochs,
                           measure=override(base.measure, b.measure, "measure")) if b.recipe == "ddpm" else None


class DiffusionModels(ModelKind):
    """Per-kind strategy of ModelRegistry for class-conditional DDPMs."""

    dtypes = ("float32",)  # training steps and SalUn's masked Adam steps on the weights themselves

    def __init__(self, registry: ModelRegistry):
        super().__init__(registry)
        self._cache: dict[str, tuple[str, DiffusionTarget]] = {}  # model -> (head id, target)

    def check(self, name: str, spec: Model) -> None:
        """Start-up check of the model's bootstrap settings (raises ValueError)."""
        if spec.bootstrap.recipe not in ("ddpm", "none"):
            raise ValueError(
                f"bootstrap.recipe {spec.bootstrap.recipe!r} does not build a diffusion model (use 'ddpm')"
            )
        recipe(spec)

    def check_ready(self, name: str) -> None:
        if self.ledger.head(name) is None:
            raise ModelNotReady(name)

    def precheck(self, name: str, forget: Forget) -> None:
        """What can be told without the model's weights: the kind of request and the class range (InvalidForget)."""
        from adapters.diffusion.target import UNSERVABLE

        if forget.kind != "class":
            raise InvalidForget(UNSERVABLE.get(forget.kind, f"diffusion models cannot serve forget.{forget.kind}"))
        if forget.class_label is None:
            raise InvalidForget("forget.class is required")
        head = self.ledger.head(name)
        num_classes = (head.info.get("spec") or {}).get("num_classes") if head is not None else None
        if num_classes is not None and not 0 <= forget.class_label < num_classes:
            raise InvalidForget(f"class {forget.class_label} outside 0..{num_classes - 1} (the classes {name} "
                                "generates)")

    # --- bootstrap ------------------------------------------------------------------------------------------

    def bootstrap(self, name: str, spec: Model, *, progress: bool = True,
                  stop: threading.Event | None = None) -> ArtifactRow | None:
        """Train the model's first version (progress in the log) if the ledger has none, then publish the data
        set, the judge and the version, and record it in one ledger transaction. Raises training.TrainingStopped
        when `stop` is set."""
        from adapters import datasets
        from adapters.diffusion import demo, judge

        head = self.ledger.head(name)
        if head is not None:
            return head
        r = recipe(spec)
        if r is None:
            raise RuntimeError(f"model {name!r} has no version yet and bootstrap.recipe = {spec.bootstrap.recipe!r} "
                               "cannot build one")
        split = datasets.DATASETS[r.dataset](seed=r.seed)
        log.info("bootstrapping %s: training a class-conditional DDPM (%dx%d, channels %s) on %d %s rows for %d steps, "
                 "then its judge; requests for it wait until it is ready", name, r.spec.resolution, r.spec.resolution,
                 list(r.spec.channels), len(split.train), r.dataset, r.train.steps)
        built = demo.bootstrap(r, data=split, on_progress=progress_logger(name, log), stop=stop,
                               device=resolve_device(spec.device))
        self.store.publish(name, "dataset", DATASET_ID, split.save,
                           {"dataset": r.dataset, "num_classes": split.num_classes,
                            "input_shape": list(split.input_shape), "train_rows": len(split.train),
                            "test_rows": len(split.test)})
        self.store.publish(name, *JUDGE, lambda d: judge.save_judge(built.judge, d), {"spec": built.judge_spec})
        change = built.first_version()
        version = self.ledger.allocate_id(name, "version")
        art = self.store.publish(name, "versions", version, change.save,
                                 {"parent": None, "metrics": change.metrics, **change.info})
        self.ledger.add_artifact(name, version, "version", parent=None, request_id=None, path=str(art.path),
                                 sha256=art.sha256, metrics=change.metrics, info=change.info)
        m = change.metrics
        log.info("registered %s %s: trained in %.0fs; its judge reads %.1f%% of the samples of each class as that "
                 "class (lowest class %.1f%%)", name, version, m["train_seconds"], 100 * m["recognition_mean"],
                 100 * m["recognition_min"])
        return self.ledger.head(name)

    # --- targets --------------------------------------------------------------------------------------------

    def target(self, name: str, version: str | None = None) -> DiffusionTarget:
        """The DiffusionTarget of the head (or of `version`). Raises ModelNotReady before the first version."""
        from adapters import datasets
        from adapters.diffusion import judge, target

        row = self.ledger.head(name) if version is None else self.ledger.get_artifact(name, version)
        if row is None:
            if version is not None:
                raise KeyError(f"{name} has no version {version}")
            raise ModelNotReady(name)
        cached = self._cache.get(name)
        if cached and cached[0] == row.id:
            return cached[1]
        device = resolve_device(self.registry.spec(name).device)
        if cached:
            data, judge_model = cached[1].data, cached[1].judge
        else:
            meta = self.store.meta(name, "dataset", DATASET_ID)
            data = datasets.Split.load(self.store.path(name, "dataset", DATASET_ID), meta["num_classes"],
                                       tuple(meta["input_shape"]))
            judge_model = judge.load_judge(self.store.meta(name, *JUDGE)["spec"], self.store.path(name, *JUDGE),
                                           device)
        loaded = target.load_target(name, row.id, Path(row.path), row.info, data, judge_model,
                                    forgotten=self.ledger.forgotten_ids(name, row.id), device=device)
        if version is None:
            self._cache[name] = (row.id, loaded)
        return loaded

    def after_commit(self, name: str, change: Change, target: Any, artifact_id: str) -> None:
        """Keep the in-memory target in step with a committed version: no reload for the next request."""
        if hasattr(change, "module"):
            self._cache[name] = (artifact_id, target.advanced(change, artifact_id))
        else:  # files staged by a child process: the next request loads them
            self._cache.pop(name, None)

    def on_rollback(self, name: str) -> None:
        self._cache.pop(name, None)

    def sample_grid(self, name: str, version: str | None, classes: Sequence[int] | None, n: int, seed: int,
                    steps: int) -> tuple[bytes, str]:
        """(PNG bytes, version id) of a sample grid of the head (or `version`): one row per class."""
        from adapters.diffusion import grid

        t = self.target(name, version)
        if classes is not None:
            # the daemon's DDPMs are class-conditional: [bootstrap.ddpm] cannot unset num_classes (TOML has no null)
            num_classes = cast(int, t.spec.num_classes)
            bad = [c for c in classes if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"class(es) {bad} outside 0..{num_classes - 1}")
        return grid.sample_grid(t.model, t.spec, classes, n=n, seed=seed, steps=steps), t.version
