"""IAU's retain budget counts from a model's first version across restarts: when the daemon prepares a model at
start it loads the first version of the head's lineage from the ledger, not only the head it happens to start at,
so guard-bound requests on either side of a restart cannot add up to more than the budget."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from adapters.base import Forget
from adapters.classifier import measures
from adapters.classifier.model import WeightChange, state_of
from adapters.store import ArtifactStore
from daemon import config as config_mod
from daemon.ledger import Ledger
from daemon.models import ModelRegistry
from tests.harness import CONFIG_TEMPLATE, TEST_MODEL

FORGOTTEN_BEFORE = tuple(range(20))  # what the later version's own request forgot


def _start(tmp_path: Path, state: Path) -> tuple[ModelRegistry, Ledger]:
    """A registry over the state directory, as the daemon builds one at start."""
    path = tmp_path / "config.toml"
    path.write_text(CONFIG_TEMPLATE.format(bootstrap="127.0.0.1:1", group="g", prefix="p", state=state,
                                           metrics_port=0, model=TEST_MODEL))
    cfg = config_mod.load(path, env={})
    ledger = Ledger(cfg.state.ledger_path)
    return ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger), ledger


def _damaged(model: torch.nn.Module) -> torch.nn.Module:
    """The model with noise on its weights: a later version that lost more retain accuracy than the budget."""
    damaged = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.4 * p.abs().mean())
    return damaged


def _record_version(registry: ModelRegistry, ledger: Ledger, module: torch.nn.Module, spec: dict, parent: str) -> str:
    """Record `module` as a new head built on `parent`, as a committed request leaves it."""
    version = ledger.allocate_id(TEST_MODEL, "version")
    art = registry.store.publish(TEST_MODEL, "versions", version, WeightChange(state_of(module), {}).save,
                                 {"spec": spec, "parent": parent, "metrics": {}})
    ledger.add_artifact(TEST_MODEL, version, "version", parent=parent, request_id=None, path=str(art.path),
                        sha256=art.sha256, metrics={}, info={"spec": spec}, forgotten_ids=FORGOTTEN_BEFORE)
    return version


def test_a_restart_keeps_the_lineages_retain_budget(tmp_path, bootstrapped_state):
    state = tmp_path / "var"
    shutil.copytree(bootstrapped_state, state)
    registry, ledger = _start(tmp_path, state)
    first = registry.target(TEST_MODEL)
    later = _record_version(registry, ledger, _damaged(first.model), first.spec, parent=first.version)
    remaining = first.data.train.without_ids(FORGOTTEN_BEFORE)
    lost = measures.accuracy(first.model, remaining) - measures.accuracy(_damaged(first.model), remaining)
    assert lost > 0.04  # the later version has spent more than the budget (0.02)
    ledger.close()

    registry, ledger = _start(tmp_path, state)  # a restart: the daemon starts at the later version
    head = registry.target(TEST_MODEL)
    assert (head.version, head.forgotten) == (later, frozenset(FORGOTTEN_BEFORE))
    registry.prepare(TEST_MODEL)
    engine = registry.engine("iau", TEST_MODEL)
    metrics = engine.apply(head, Forget(sample_ids=list(range(20, 60)))).metrics
    # counted from the first version, the budget is spent: no step may cost retain accuracy; a budget that began
    # at the restart would allow max_retain_drop below this version
    assert metrics["retain_acc_floor"] == metrics["retain_acc_before"]
    assert metrics["retain_acc_after"] >= metrics["retain_acc_before"]

    fresh = type(engine)(engine.config)  # an engine prepared on the head alone counts from the head
    fresh.warm_cache(head)
    alone = fresh.apply(head, Forget(sample_ids=list(range(20, 60)))).metrics
    assert alone["retain_acc_floor"] == pytest.approx(alone["retain_acc_before"] - engine.config.max_retain_drop)
    engine.wait_for_refresh()
    fresh.wait_for_refresh()
    ledger.close()
