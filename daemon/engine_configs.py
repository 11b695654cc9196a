"""Start-up check of the engine settings: an operator's typo stops `unlearnd run`, naming the dotted key.

Engine settings come from three places, merged per (model, method) when the engine is built
(ModelRegistry.engine_settings): ``[methods.<method>]`` (the method's first model kind), its sub-table named after
another kind (``[methods.salun.diffusion]``), and ``[models.<name>.methods.<method>]``. Each table is checked on
its own against its engine's typed Config (adapters.base.config_from_mapping: known keys, field types, Literal
choices, `__post_init__` ranges), so the message names the table the typo is in, e.g.
``methods.iau.alhpa: unknown key``. Then every engine a configured model can be asked for with settings is built,
which also catches a problem only the merged settings have. None of this waits for the first request: a bad
setting is the operator's to fix, never a requester's `invalid_forget` nor a crash in the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.base import Engine, EngineConfigError, config_from_mapping, engine_class, engine_names
from daemon.config import FORGET_KINDS, Config, ConfigError

if TYPE_CHECKING:
    from daemon.models import ModelRegistry

MODEL_KINDS = tuple(FORGET_KINDS)  # a sub-table of [methods.<method>] named after one holds that kind's settings


def check_engines(config: Config, registry: ModelRegistry) -> None:
    """Raise ConfigError for the first engine table that is unknown or invalid; then build, in `registry`, every
    engine a model's settings name (they are the ones it serves with)."""
    for method, table in config.methods.items():
        if method not in engine_names():
            raise ConfigError(f"methods.{method}: unknown method (known: {', '.join(engine_names())})")
        _check(engine_class(method), {k: v for k, v in table.items() if k not in MODEL_KINDS}, f"methods.{method}")
        for kind in MODEL_KINDS:
            if kind in table:
                where = f"methods.{method}.{kind}"
                if not isinstance(table[kind], dict):
                    raise ConfigError(f"{where}: must be a table of {kind} settings")
                _check(_engine_for(method, kind, where), table[kind], where)
    for name, spec in config.models.items():
        for method, table in spec.methods.items():
            where = f"models.{name}.methods.{method}"
            _check(_engine_for(method, spec.kind, where), table, where)
        for method in sorted(set(config.methods) | set(spec.methods)):
            if _applies(method, spec.kind):
                try:
                    registry.engine(method, name)
                except (TypeError, ValueError) as exc:  # settings fine alone, not together (e.g. lr_min > lr_max)
                    raise ConfigError(f"models.{name} ({method} settings merged over [methods.{method}]): {exc}") \
                        from None


def _check(cls: type[Engine], table: dict[str, Any], where: str) -> None:
    try:
        config_from_mapping(cls, table, where)
    except EngineConfigError as exc:
        raise ConfigError(str(exc)) from None


def _engine_for(method: str, kind: str, where: str) -> type[Engine]:
    try:
        return engine_class(method, kind)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None


def _applies(method: str, kind: str) -> bool:
    try:
        engine_class(method, kind)
    except KeyError:
        return False
    return True
