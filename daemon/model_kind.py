"""What ModelRegistry (daemon/models.py) asks of a model kind, the way peft's BaseTuner declares what a tuner
must provide.

A model kind (config `models.<name>.kind`) decides how a model gets its first state, what an engine is handed
(its *target*), which files a change adds to its artifact, what in-memory (or stored) state a commit or a rollback
must refresh, and what a result event says about a change beyond its id. The registry stays the same for every
kind: it looks a model's kind up in `daemon.models.KINDS` and calls these methods; it never asks which kind, engine
or change it holds. A new kind subclasses `ModelKind`, implements `bootstrap` and `target`, overrides what differs
from the defaults below, and is added to `KINDS`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.base import Change, Forget

if TYPE_CHECKING:
    from adapters.store import ArtifactStore
    from daemon.config import Config, Model
    from daemon.ledger import ArtifactRow, Ledger
    from daemon.models import ModelRegistry

DATASET_ID = "registered"  # the store's id of a model's registered training rows (classifier, diffusion)
#: The store folder of each kind of artifact (Change.kind): weights, LoRA adapters, edited images.
ARTIFACT_FOLDERS = {"version": "versions", "adapter": "adapters", "erasure": "erasures"}


class ModelKind(ABC):
    """The per-kind strategy of ModelRegistry: one instance per registry, shared by every model of the kind."""

    #: The `models.<name>.dtype` values the kind runs in (checked at start-up): kinds whose engines change the
    #: served weights themselves keep them float32.
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    @property
    def config(self) -> Config:
        return self.registry.config

    @property
    def store(self) -> ArtifactStore:
        return self.registry.store

    @property
    def ledger(self) -> Ledger:
        return self.registry.ledger

    # --- start-up and admission -----------------------------------------------------------------------------

    def check(self, name: str, spec: Model) -> None:
        """Start-up check of the model's kind-specific settings; raises ValueError starting with the key below
        `models.<name>.` that is wrong."""

    def check_ready(self, name: str) -> None:
        """Raises a Transient (the daemon pauses and retries) while the model cannot take requests yet."""

    def precheck(self, name: str, forget: Forget) -> None:
        """A cheap check before a request waits for its model: raises InvalidForget for one the kind can never
        serve. The engine's own `validate` still runs later, on the target."""

    # --- bootstrap ------------------------------------------------------------------------------------------

    def bootstraps_later(self, name: str) -> bool:
        """Whether the model has no first state yet and builds it in the background once the daemon consumes."""
        return self.registry.spec(name).bootstraps_in_background and self.ledger.head(name) is None

    @abstractmethod
    def bootstrap(self, name: str, spec: Model, *, progress: bool = True,
                  stop: threading.Event | None = None) -> ArtifactRow | None:
        """Make the model servable on first start (e.g. train and record its first version); later starts reuse
        what the first one built. Returns the ledger's head of the model (None for kinds without versions)."""

    # --- targets and changes --------------------------------------------------------------------------------

    @abstractmethod
    def target(self, name: str) -> Any:
        """What an engine needs to apply a request to the model as it is now."""

    def lineage_start(self, name: str) -> Any | None:
        """The target of the first version of the head's lineage (what the model was registered or bootstrapped
        as), for engines that measure a lineage from its start (IAU's retain budget); None where the head is that
        version, or for kinds without versions."""
        return None

    def parent(self, target: Any) -> str | None:
        """The artifact a change of `target` derives from, recorded as the new artifact's parent: by default the
        target's version."""
        version: str | None = target.version
        return version

    def writer(self, change: Change, artifact_id: str, target: Any) -> Callable[[Path], None]:
        """What writes `change` as the artifact `artifact_id` into the store's staging directory: by default its
        own files. Runs in the process that applied the change (a child, for an isolated request)."""
        return change.save

    def after_commit(self, name: str, change: Change, target: Any, artifact_id: str) -> None:
        """`change` is committed as `artifact_id`: keep in-memory targets in step (no reload for the next
        request). A change staged by a child process (daemon.isolation) carries files only."""

    def receipt(self, name: str, change: Change, artifact_id: str) -> dict[str, Any] | None:
        """What the result event of the committed `change` carries besides its version or adapter id (an image
        erasure's receipt); None for kinds whose changes have none. Reads `change.info`, which a change staged by
        a child process carries too."""
        return None

    def on_rollback(self, name: str) -> None:
        """The model's head moved (a rollback, or another replica's commit on a shared ledger): drop what is cached
        about the head it left."""

