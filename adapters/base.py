"""The shared shape of every unlearning engine.

An engine takes a *target* (the model as it is now, plus the data it needs) and a `Forget` (what a request
asks to forget) and returns a `Change`: something the artifact store can persist as a new, reversible
artifact, plus the method's own before/after measures. Engines never persist anything themselves and never
touch Kafka or the ledger; that is the daemon's job. This keeps them usable from a notebook, a benchmark or
another serving stack.

Engines register under the method name a request carries (``"iau"``, ``"salun"``, ``"o3"``, ...), the way
peft's tuners are chosen by name, once per model kind they serve: one method name may have an engine per kind
(SalUn for classifiers and SalUn for diffusion models are both ``"salun"``).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from pydantic import TypeAdapter, ValidationError


class EngineError(Exception):
    """An engine could not apply a request. `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class InvalidForget(EngineError):
    """The request is well-formed but cannot apply to this model (e.g. unknown sample ids). Never retried.
    `reason` is the dead-letter reason it is filed under: a short fixed code (the daemon's closed set,
    daemon.schema.DeadLetterReason, lists the ones engines use; any other is filed as "invalid_forget")."""

    def __init__(self, message: str, reason: str = "invalid_forget"):
        super().__init__(message, retryable=False)
        self.reason = reason


class NothingToForget(EngineError):
    """Everything the request names is already forgotten by the target: the request is satisfied as it stands,
    and there is no change to make. Not an error for the requester; the daemon answers it `applied`."""

    def __init__(self, already_forgotten: int):
        super().__init__(f"every named sample ({already_forgotten}) is already forgotten", retryable=False)
        self.already_forgotten = already_forgotten


@dataclasses.dataclass(frozen=True)
class Forget:
    """What one request asks the model to forget. Exactly one kind of target is set."""

    sample_ids: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()
    qa: tuple[tuple[str, str], ...] = ()
    class_label: int | None = None
    concept: str | None = None
    image: str | None = None
    mask: str | None = None

    @property
    def kind(self) -> str:
        for name in ("sample_ids", "texts", "qa"):
            if getattr(self, name):
                return name
        if self.class_label is not None:
            return "class"
        if self.concept is not None:
            return "concept"
        if self.image is not None:
            return "image"
        return "empty"

    def merged(self, other: Forget) -> Forget:
        """Union of two sample-id requests (coalescing: deltas of one step are additive)."""
        if self.kind != "sample_ids" or other.kind != "sample_ids":
            raise ValueError("only sample-id requests can be merged")
        return Forget(sample_ids=tuple(sorted(set(self.sample_ids) | set(other.sample_ids))))


#: The measure an engine that tests its own result puts among `Change.metrics`: 1.0 when the forget set passes the
#: engine's test of forgetting after the change (a classifier's criterion, adapters/classifier/criteria.py), 0.0
#: when the change stopped short of it (e.g. IAU's retain-accuracy guard capped the step). The change is still a
#: valid version; the daemon counts and logs the short ones so that an operator sees them.
CRITERION_MET = "criterion_met"


class Change(ABC):
    """A reversible model change produced by an engine, not yet persisted.

    `save(directory)` writes the artifact's files into an empty staging directory; the artifact store makes
    it durable and atomic (fsync, rename). Formats: safetensors for weights, PEFT's own layout for adapters.
    """

    #: "version" (a full new set of weights) or "adapter" (a LoRA adapter on top of the base); a class attribute
    #: of each subclass (a change staged by a child process carries the kind it was staged with).
    kind: str

    def __init__(self, metrics: dict[str, float], *, forgotten_ids: tuple[int, ...] = (), info: dict | None = None):
        self.metrics = metrics
        self.forgotten_ids = forgotten_ids
        self.info = info or {}

    @abstractmethod
    def save(self, directory: Path) -> None: ...


class Engine(ABC):
    """One unlearning method. Subclasses set `name`, `model_kinds` and a `Config` dataclass: typed fields (a
    Literal for a choice) and a `__post_init__` that raises ValueError("field: problem") for a value out of range,
    so that `config_from_mapping` refuses a bad setting at start-up with its dotted key."""

    name: ClassVar[str]
    model_kinds: ClassVar[frozenset[str]]
    Config: ClassVar[type]
    #: Whether several requests for one model may be merged into one application (additive deltas).
    coalescable: ClassVar[bool] = False
    #: Whether `apply` takes a `progress` callback (keyword) and calls it with a dict per step of a long run
    #: (e.g. {"epoch", "epochs", "loss", "elapsed_s", "eta_s"}), for the daemon's log and progress events.
    reports_progress: ClassVar[bool] = False
    #: Whether the engine keeps something per model version between requests that `prepare` computes ahead of
    #: the first request (the daemon then loads the model's target at start to hand it over).
    prepares: ClassVar[bool] = False

    def __init__(self, config: Any = None, **overrides: Any):
        base = config if config is not None else self.Config()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    def validate(self, target: Any, forget: Forget) -> None:
        """Cheap check that raises InvalidForget for a request that cannot apply to `target`; lets the daemon
        keep a bad request out of a coalesced group. Engines without a cheap check accept everything here."""

    @abstractmethod
    def apply(self, target: Any, forget: Forget, progress: Callable[[dict], None] | None = None) -> Change:
        """Compute the change that makes `target` forget `forget`. Must not mutate `target`'s weights. Engines
        whose `reports_progress` is set call `progress` with stage events; the others never call it."""

    def prepare(self, target: Any, start: Any | None = None) -> None:
        """Start computing what the engine keeps between requests for `target` (the model as it is now), off the
        request path, and return at once: the first request after a start then does not pay for it. `start`: the
        first version of the target's lineage, where that is another version (IAU's retain budget counts from
        it, across restarts). Only called on engines whose `prepares` is set."""

    def forget_cache(self, model_name: str) -> None:
        """Drop what the engine keeps about `model_name` between requests (its versions were rolled back).
        Engines without a cache have nothing to drop."""


_ENGINES: dict[tuple[str, str], type[Engine]] = {}  # (model kind, method) -> engine


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine available under its method name, for each model kind it serves."""
    for kind in cls.model_kinds:
        known = _ENGINES.get((kind, cls.name))
        if known is not None and known is not cls:
            raise ValueError(f"engine {cls.name!r} registered twice for {kind} models")
        _ENGINES[(kind, cls.name)] = cls
    return cls


#: Built-in engines by method name and model kind, in order of precedence; each module is imported only when
#: its engine is first asked for, so a classifier-only deployment never pays for importing transformers,
#: peft or diffusers.
BUILTIN_ENGINES = {
    "iau": {"classifier": "adapters.classifier.iau"},
    "salun": {"classifier": "adapters.classifier.salun", "diffusion": "adapters.diffusion.salun"},
    "o3": {"causal_lm": "adapters.lm.o3"},
    "attentive_eraser": {"images": "adapters.images.erasure"},
}


def engine_class(method: str, model_kind: str | None = None) -> type[Engine]:
    """The engine of `method` for `model_kind`. Without a kind, the method's first built-in kind (or its only
    registered one): what callers that predate per-kind engines get, e.g. "salun" -> the classifier engine."""
    if model_kind is None:
        kinds = list(BUILTIN_ENGINES.get(method, {})) or [k for k, m in _ENGINES if m == method]
        if not kinds:
            raise KeyError(f"unknown method {method!r}; known: {engine_names()}")
        model_kind = kinds[0]
    key = (model_kind, method)
    if key not in _ENGINES and model_kind in BUILTIN_ENGINES.get(method, {}):
        importlib.import_module(BUILTIN_ENGINES[method][model_kind])  # the module registers itself
    try:
        return _ENGINES[key]
    except KeyError:
        known = sorted(set(BUILTIN_ENGINES.get(method, {})) | {k for k, m in _ENGINES if m == method})
        if known:
            raise KeyError(f"method {method!r} does not apply to {model_kind} models (it serves: {known})") from None
        raise KeyError(f"unknown method {method!r}; known: {engine_names()}") from None


def engine_names(model_kind: str | None = None) -> list[str]:
    """Method names, of every kind or of one."""
    names = {m for k, m in _ENGINES if model_kind in (None, k)}
    names |= {m for m, kinds in BUILTIN_ENGINES.items() if model_kind is None or model_kind in kinds}
    return sorted(names)


def check_fields(config: Any, *, positive: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """For an engine Config's `__post_init__`: every Literal field holds one of its values, the `positive` fields
    are > 0 and the `fractions` in [0, 1]. Raises ValueError("field: problem")."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if get_origin(hint) is Literal and value not in get_args(hint):
            raise ValueError(f"{f.name}: must be one of {list(get_args(hint))}, not {value!r}")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name}: must be > 0, not {getattr(config, name)!r}")
    for name in fractions:
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"{name}: must be in [0, 1], not {getattr(config, name)!r}")


class EngineConfigError(ValueError):
    """An engine setting that is unknown or invalid; the message names its dotted key, e.g.
    ``methods.iau.alhpa: unknown key``."""


def config_from_mapping(cls: type[Engine], values: dict[str, Any], where: str | None = None) -> Any:
    """Build an engine's Config dataclass from a config.toml table (`where`, default ``methods.<name>``): every key
    must be a field, every value must fit the field's type (a Literal field takes only its listed values), and the
    dataclass's own `__post_init__` checks run. Raises EngineConfigError naming each bad key."""
    where = where or f"methods.{cls.name}"
    known = sorted(f.name for f in dataclasses.fields(cls.Config))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise EngineConfigError("; ".join(f"{where}.{key}: unknown key (known: {', '.join(known)})"
                                          for key in unknown))
    try:
        return TypeAdapter(cls.Config).validate_python(dict(values))
    except ValidationError as exc:
        raise EngineConfigError("; ".join(_config_problem(where, e) for e in exc.errors())) from None


def _config_problem(where: str, error: Any) -> str:
    """One pydantic error as `dotted.key: problem`. A `__post_init__` check raises ValueError("field: problem")."""
    if error["loc"]:
        return f"{where}.{'.'.join(map(str, error['loc']))}: {error['msg']}"
    cause = error.get("ctx", {}).get("error")
    return f"{where}.{cause}" if cause is not None else f"{where}: {error['msg']}"
