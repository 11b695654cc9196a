"""Registered models: how each is bootstrapped, loaded as an engine target, changed and rolled back.

The ledger says which artifact is active; the artifact store holds the files. This module joins the two for
the daemon and the CLI: `target()` builds what an engine needs, `commit()` makes a change durable (files
first, then one ledger transaction), `rollback()` restores an earlier state exactly. What differs between model
kinds lives in one strategy per kind (`KINDS`, contract in daemon/model_kind.py); nothing here asks which kind,
engine or change it holds.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.base import Change, Engine, Forget, config_from_mapping, engine_class
from adapters.devices import resolve_device
from adapters.store import ArtifactStore
from daemon import failpoints
from daemon.classifier_models import ClassifierModels
from daemon.config import FORGET_KINDS, Config, ConfigError, Model
from daemon.diffusion_models import DiffusionModels
from daemon.image_models import ImagesModels
from daemon.ledger import ArtifactRow, Ledger, LedgerConflict
from daemon.lm_models import LMModels
from daemon.lm_models import new_router as new_router  # serve builds its router here
from daemon.model_kind import ARTIFACT_FOLDERS, ModelKind

log = logging.getLogger("daemon.models")

#: The strategy of each model kind (config `models.<name>.kind`).
KINDS: dict[str, type[ModelKind]] = {"classifier": ClassifierModels, "causal_lm": LMModels,
                                     "diffusion": DiffusionModels, "images": ImagesModels}


class UnknownModel(KeyError):
    def __str__(self) -> str:  # KeyError's own str() quotes its message, which already quotes the name
        return str(self.args[0])


@dataclass
class Committed:
    artifact_id: str
    kind: str
    path: Path
    sha256: str
    receipt: dict[str, Any] | None = None  # what the kind reports of it besides its id (an image erasure's receipt)


class ModelRegistry:
    def __init__(self, config: Config, store: ArtifactStore, ledger: Ledger):
        self.config = config
        self.store = store
        self.ledger = ledger
        self._engines: dict[tuple[str, str], Engine] = {}  # (model, method) -> engine
        self._kinds = {kind: strategy(self) for kind, strategy in KINDS.items()}

    # --- lookup ---------------------------------------------------------------------------------------------

    def spec(self, name: str) -> Model:
        try:
            return self.config.models[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; registered: {sorted(self.config.models)}") from None

    def kind_strategy(self, name: str) -> ModelKind:
        """The strategy of a model's kind (e.g. DiffusionModels)."""
        return self._kinds[self.spec(name).kind]

    def method_for(self, name: str, requested: str | None, forget_kind: str | None = None) -> str:
        """The method named by the request, else the model's default for this kind of forget request."""
        return requested or self.spec(name).default_method(forget_kind)

    def check_methods(self) -> None:
        """Start-up check: every model's default methods are engines for its kind and its device exists here
        (raises ConfigError). Not run by CLI commands that build a registry, since it imports every engine named
        (an LM engine imports peft)."""
        for name, spec in self.config.models.items():
            try:
                resolve_device(spec.device)  # "cuda" without a GPU fails the start, never runs on the CPU instead
            except RuntimeError as exc:
                raise ConfigError(f"models.{name}.device: {exc}") from None
            if spec.dtype not in self.kind_strategy(name).dtypes:
                raise ConfigError(f"models.{name}.dtype: {spec.kind} models train and unlearn in "
                                  f"{' or '.join(self.kind_strategy(name).dtypes)}, not {spec.dtype}")
            named = [(spec.default_method(kind), f"method_by_forget.{kind}") for kind in spec.method_by_forget]
            named += [(method, f"allowed_methods.{kind}") for kind, ms in spec.allowed_methods.items() for method in ms]
            for method, where in [(spec.default_method(), "method"), *named]:
                try:
                    self.engine(method, name)  # the engine exists for the kind and its settings are known keys
                except KeyError:
                    raise ConfigError(f"models.{name}.{where}: method {method!r} does not apply to {spec.kind} "
                                      "models") from None
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"models.{name}: {exc}") from None
            try:
                self.kind_strategy(name).check(name, spec)
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

    def engine_settings(self, method: str, spec: Model) -> dict[str, Any]:
        table = dict(self.config.methods.get(method, {}))
        per_kind = {k: table.pop(k) for k in list(table) if k in FORGET_KINDS}  # sub-tables named after a kind
        own = table if engine_class(method) is engine_class(method, spec.kind) else {}
        return {**own, **per_kind.get(spec.kind, {}), **spec.methods.get(method, {})}

    def check_ready(self, name: str) -> None:
        """Raises a transient ModelNotReady while a model's first version is still being built in the background."""
        self.kind_strategy(name).check_ready(name)

    def precheck(self, name: str, forget: Forget) -> None:
        """A cheap check before a request waits for its model (raises InvalidForget), for kinds that have one."""
        self.kind_strategy(name).precheck(name, forget)

    # --- bootstrap ------------------------------------------------------------------------------------------

    def bootstraps_later(self, name: str) -> bool:
        """Whether the model has no version yet and is built in the background once the daemon consumes."""
        return self.kind_strategy(name).bootstraps_later(name)

    def ensure_bootstrapped(self, name: str, progress: bool = True,
                            stop: threading.Event | None = None) -> ArtifactRow | None:
        """Build the model's first version if the ledger has none (first start); later starts reuse it. Replicas
        sharing a ledger that start together take turns: one builds it, the others then find it there."""
        with self.ledger.exclusive(f"bootstrap:{name}"):
            return self.kind_strategy(name).bootstrap(name, self.spec(name), progress=progress, stop=stop)

    # --- targets and changes --------------------------------------------------------------------------------

    def prepare(self, name: str) -> None:
        """Let the engines of the model's default methods start computing, in the background, what they keep
        between requests for its head (IAU: the remaining-set gradient), so the first request after a start does
        not pay for it, and what they measure from its lineage's first version (IAU: the retain budget, which so
        spans restarts). Loads the targets only for such engines. Never raises: a failure here only costs the first
        request the time it would save, and that request meets the cause itself."""
        try:
            spec = self.spec(name)
            methods = sorted({spec.default_method(forget_kind) for forget_kind in FORGET_KINDS[spec.kind]})
            engines = [engine for engine in (self.engine(method, name) for method in methods) if engine.prepares]
            target = self.target(name) if engines else None
            start = self.kind_strategy(name).lineage_start(name) if engines else None
            for engine in engines:
                engine.prepare(target, start)
        except Exception:
            log.warning("could not prepare the engines of %s ahead of its first request", name, exc_info=True)

    def target(self, name: str) -> Any:
        """What an engine needs to apply a request to this model as it is now."""
        return self.kind_strategy(name).target(name)

    def artifact_writer(self, name: str, change: Change, artifact_id: str, target: Any) -> Callable[[Path], None]:
        """What writes `change` of model `name` as the artifact `artifact_id` into a staging directory: its
        files, and what its kind derives from them (an O3 adapter's gate and result measures)."""
        return self.kind_strategy(name).writer(change, artifact_id, target)

    def commit(self, name: str, change: Change, *, target: Any, request_ids: list[str],
               finish: Callable[[str], None]) -> Committed:
        """Make a change durable: files first (atomic publish), then ONE ledger transaction that records the
        artifact, activates it, and runs `finish(artifact_id)` (the caller marks its requests applied there).
        A crash between the two leaves an orphan directory that a retry overwrites; nothing is applied twice.
        On a shared ledger, raises HeadMoved / AppliedElsewhere (ledger.LedgerConflict) when another replica got
        there first; the caller re-reads the ledger and rebuilds on the new head, or answers from it."""
        kind = self.kind_strategy(name)
        parent = kind.parent(target)
        if change.kind == "version":
            change.info.setdefault("spec", target.spec)
        folder = ARTIFACT_FOLDERS.get(change.kind, "adapters")
        # a change staged by a child process (daemon.isolation) carries the id its files were written for
        artifact_id = getattr(change, "artifact_id", None) or self.ledger.allocate_id(name, change.kind)
        meta = {"parent": parent, "request_ids": request_ids, "metrics": change.metrics, **change.info}
        write = self.artifact_writer(name, change, artifact_id, target)
        art = self.store.publish(name, folder, artifact_id, write, meta)
        failpoints.hit("after_artifact")
        try:
            with self.ledger.transaction():
                self.ledger.claim_unapplied(request_ids)
                self.ledger.add_artifact(name, artifact_id, change.kind, parent=parent, request_id=request_ids[0],
                                         path=str(art.path), sha256=art.sha256, metrics=change.metrics,
                                         info=change.info, forgotten_ids=change.forgotten_ids)
                finish(artifact_id)
        except LedgerConflict:  # another replica moved the head or applied the request: this attempt left no row
            kind.on_rollback(name)  # the head is not what the cached target was built on
            if self.ledger.shared:  # its id was handed out to this attempt alone: nobody else reads the files
                shutil.rmtree(art.path, ignore_errors=True)
            raise
        kind.after_commit(name, change, target, artifact_id)
        return Committed(artifact_id, change.kind, art.path, art.sha256, kind.receipt(name, change, artifact_id))

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
        self.kind_strategy(name).on_rollback(name)
        for engine in self._engines.values():
            engine.forget_cache(name)
        return row
