"""Every model kind the configuration accepts has a complete strategy for the registry."""

from __future__ import annotations

import inspect
import typing

from daemon.config import FORGET_KINDS, Model
from daemon.model_kind import ModelKind
from daemon.models import KINDS


def test_every_configurable_kind_has_a_concrete_strategy():
    configurable = set(typing.get_args(Model.model_fields["kind"].annotation))
    assert configurable == set(KINDS) == set(FORGET_KINDS)
    for kind, strategy in KINDS.items():
        assert issubclass(strategy, ModelKind) and not inspect.isabstract(strategy), kind
