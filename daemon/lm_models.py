"""The causal-LM model kind in the daemon: an unchanged base model, one O3 adapter (with its gate) per request.

ModelRegistry (daemon/models.py) hands models of kind "causal_lm" to this strategy. The base weights are never
a version: a transformers directory, or the bundled SmolLM2 GGUF converted once into the model's store folder.
Each change is an adapter (`adapters/aNNNN/`: PEFT's layout plus the gate the engine's change fits into its
`GATE_SUBDIR`); rollback deactivates one adapter and leaves the base and the others as they are.

Nothing here imports transformers or peft at module level: a classifier-only deployment never pays for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.base import Change
from adapters.devices import device_of
from daemon.config import Config, Model
from daemon.ledger import ArtifactRow
from daemon.model_kind import ModelKind
from detector.gate import has_gate

if TYPE_CHECKING:  # torch-heavy: imported where used
    from adapters.lm.measures import ForgetItems
    from adapters.lm.o3 import LMTarget
    from daemon.models import ModelRegistry
    from detector import Encoder, Router

log = logging.getLogger("daemon.models")  # the registry's log, as before the kinds had modules of their own


class LMModels(ModelKind):
    """Per-kind strategy of ModelRegistry for causal LMs served with per-request O3 adapters."""

    def __init__(self, registry: ModelRegistry):
        super().__init__(registry)
        self._targets: dict[str, LMTarget] = {}  # model -> adapters.lm.o3.LMTarget (holds the loaded base model)
        self._encoder: Encoder | None = None  # loaded on the first adapter

    def base_dir(self, name: str) -> Path:
        """A causal LM's base weights: a transformers directory, or the bundled SmolLM2 GGUF converted once
        into the model's store folder (safetensors)."""
        from adapters.lm import loading as lm

        return lm.resolve_source(self.registry.spec(name).bootstrap.source or "smollm2", self.store.root / name)

    def bootstraps_later(self, name: str) -> bool:
        return False  # converting the base is quick and there is no version to build

    def bootstrap(self, name: str, spec: Model, *, progress: bool = True,
                  stop: threading.Event | None = None) -> ArtifactRow | None:
        """Adapters stack on an unchanged base: convert or locate it; there is no version to build."""
        self.base_dir(name)
        return self.ledger.head(name)

    # --- targets --------------------------------------------------------------------------------------------

    def target(self, name: str) -> LMTarget:
        """The model's LMTarget with the ledger's active adapters; the loaded base model is kept across requests."""
        from adapters.lm.o3 import LMTarget

        spec = self.registry.spec(name)
        target = self._targets.get(name) or LMTarget(name=name, base_dir=self.base_dir(name), device=spec.device,
                                                     dtype=spec.dtype)
        target.adapters = {a.id: Path(a.path) for a in self.ledger.list_artifacts(name, "adapter") if a.active}
        self._targets[name] = target
        return target

    def parent(self, target: Any) -> str | None:
        return None  # an adapter stacks on the base, which is no artifact

    def encoder(self, device: str = "cpu") -> Encoder:
        """The router's shared frozen encoder (detector.Encoder), loaded on the first adapter, on `device` (the
        device of the model it first routes for)."""
        if self._encoder is None:
            from detector import Encoder

            self._encoder = Encoder(device=device)
        return self._encoder

    def writer(self, change: Change, artifact_id: str, target: Any) -> Callable[[Path], None]:
        """An adapter's files plus its gate (`AdapterChange.fit_gate`), in one atomic publish; then the result
        measures, through the router as serving will route (adapters/lm/measures.py). The raw text leaves memory
        once written. A change staged by a child process already holds all of it."""
        from adapters.lm.o3 import AdapterChange

        if not isinstance(change, AdapterChange) or not change.forget_texts:  # staged by a child: all written
            return change.save

        def save(directory: Path) -> None:
            try:
                change.save(directory)
                change.fit_gate(directory, self.encoder(str(device_of(target.model))), artifact_id)
                if change.measure_items is not None:
                    change.metrics.update(self._served_measures(target, directory, artifact_id, change.measure_items))
            finally:
                change.drop_raw_text()

        return save

    def _served_measures(self, target: LMTarget, adapter_dir: Path, artifact_id: str,
                         items: ForgetItems) -> dict[str, float]:
        """The result event's forgetting measures: the new adapter and every active one routable, as in serving."""
        from adapters.lm.measures import served_measures
        from detector import RoutedModel

        routed = RoutedModel(target.model, target.tokenizer,
                             new_router(self.config, self.encoder(str(device_of(target.model)))))
        try:
            for aid, path in target.adapters.items():
                if has_gate(path):
                    routed.add_adapter(aid, path, lazy=True)
            routed.add_adapter(artifact_id, adapter_dir, lazy=True)
            return served_measures(routed, artifact_id, items)
        except Exception:  # a measure must never cost the request its adapter: it is reported, not required
            log.exception("result measures of %s failed; the adapter is applied without them", artifact_id)
            return {}
        finally:
            routed.release()  # LoRA layers out: the shared base model is exactly as it was


def new_router(config: Config, encoder: Encoder) -> Router:
    """The router `unlearnd serve` runs, with [serve]'s settings; the daemon's result measures route with it too."""
    from detector import Router, RouterConfig

    serve = config.serve
    return Router(encoder, RouterConfig(min_weight=serve.min_weight, margin=serve.margin,
                                        min_support=serve.min_support))
