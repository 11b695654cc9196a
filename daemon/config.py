"""unlearnd's configuration: one typed tree, every default written down once (here), loaded from config.toml.

Precedence: built-in defaults < config.toml < environment variables. An environment variable
``UNLEARND__SECTION__KEY=value`` overrides ``[section] key`` (double underscores separate levels, e.g.
``UNLEARND__KAFKA__BOOTSTRAP_SERVERS=kafka:9092``); values are parsed as TOML scalars when they can be
(``true``, ``6000``, ``"x"``), else taken as strings. Secrets (SASL password, HMAC key) are read from the
environment variable *named* in the config, never stored in the file.

A bad value fails at start-up with the dotted path of the key, e.g. ``kafka.session_timeout_ms: Input should
be a valid integer``.

Relative state paths (``state.dir``, ``state.ledger``, ``state.artifacts``, an images model's ``collection``) are
relative to the config file's directory, so the daemon and the CLI find the same ledger from any working directory;
every path recorded in the ledger and on the adapters topic is absolute.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters.base import engine_names
from adapters.devices import check_device
from daemon import config_env

DEFAULT_CONFIG = "config.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Topics(_Section):
    requests: str = "unlearn.requests"
    results: str = "unlearn.results"
    dlq: str = "unlearn.dlq"
    adapters: str = "unlearn.adapters"  # compacted; key = model/artifact id
    partitions: int = Field(3, ge=1)  # used only when the daemon creates missing topics
    replication_factor: int = Field(1, ge=1)


class Kafka(_Section):
    bootstrap_servers: str = "embedded"  # "embedded" starts the bundled Tansu broker on `embedded_port`
    embedded_port: int = Field(19092, ge=1, le=65535)
    group_id: str = "unlearnd"
    # Static membership (KIP-345): a stable id per replica (e.g. the pod name) gets its partitions back after a
    # restart instead of triggering a rebalance. Needed for multi-replica deployments with per-replica ledgers.
    group_instance_id: str | None = None
    client_id: str = "unlearnd"
    session_timeout_ms: int = Field(6000, ge=1000)  # ~6 s: fast group joins (and fast failover)
    heartbeat_interval_ms: int = Field(2000, ge=100)  # below session_timeout_ms (Kafka's rule; a third is usual)
    max_poll_records: int = Field(256, ge=1)
    poll_timeout_ms: int = Field(500, ge=10)
    # The longest a fetch waits at the broker for records. A broker answers as soon as records arrive, but not
    # every one does (the embedded Tansu broker sometimes holds a fetch to its end): the daemon's consumer and
    # the CLI's readers ask for 100 ms rather than kafka-python's 500, which cut a request's publish-to-result time
    # there (README, Configuration); an idle consumer then asks ten times a second.
    fetch_max_wait_ms: int = Field(100, ge=1, le=10_000)
    # Sent to the group coordinator as the rebalance timeout too: how long a rebalance waits for a member that
    # does not rejoin (a daemon that died mid-join). Long engine work never hits it: the daemon keeps polling
    # (its partitions paused) while an engine runs.
    max_poll_interval_ms: int = Field(20_000, ge=5_000)
    # read_committed: a request written in a Kafka transaction is read once the transaction commits, and never if
    # it aborts (a transactional producer's retries and rollbacks apply nothing). Without transactions the two
    # read the same records.
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    # How often the daemon asks the cluster a real question (with a timeout) to tell a live broker from a dead or
    # frozen one; two failed probes in a row mark it lost (unlearnd_broker_connected = 0) and it reconnects.
    liveness_interval_s: float = Field(2.0, gt=0)
    liveness_timeout_s: float = Field(5.0, gt=0)
    create_topics: bool = True
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_password_env: str = "UNLEARND_KAFKA_PASSWORD"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    reconnect_backoff_max_s: float = Field(30.0, gt=0)
    # A member of the group that holds no partition of the requests topic this long, while records wait there and
    # the group's committed offsets do not move, joins the group anew with a new consumer (a wedged group:
    # daemon/group_watch.py). Keep it above the longest request of an over-provisioned group; 0: never.
    unassigned_rejoin_s: float = Field(60.0, ge=0)
    topics: Topics = Topics()

    @model_validator(mode="after")
    def _consistent(self) -> Kafka:
        # What Kafka clients would refuse only at connect time, where it reads as a broker outage retried forever
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms: must be below kafka.session_timeout_ms "
                             f"({self.session_timeout_ms}), not {self.heartbeat_interval_ms}")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"sasl_mechanism: security_protocol {self.security_protocol} needs one")
        if self.bootstrap_servers == "embedded" and (self.security_protocol != "PLAINTEXT" or self.sasl_mechanism):
            raise ValueError("security_protocol: the embedded broker speaks PLAINTEXT only; set bootstrap_servers "
                             "to your cluster to use SASL or TLS")
        return self


class Requests(_Section):
    # A request record (key, value and headers together) larger than this goes to the DLQ as `oversize`.
    max_bytes: int = Field(1_048_576, ge=256)
    hmac_key_env: str = "UNLEARND_HMAC_KEY"  # when that variable is set, every request must be signed
    # Times the engine may fail on one request (raise, or die in its isolated process) before it is `failed`.
    # Kills of the daemon, restarts, a lost broker or a full disk never count.
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles each time
    # A full disk or a busy ledger pauses the pipeline and retries with backoff doubling up to this.
    transient_backoff_max_s: float = Field(30.0, gt=0)
    # A request that was in hand when the daemon died is applied next in a child process, so that a request which
    # itself kills the engine (segfault, OOM kill) is counted and failed, while a kill of the daemon is not.
    isolate_suspects: bool = True
    # Requests not keyed by their model are re-published keyed by it and applied by the model's partition owner,
    # so two replicas never apply one request. Off only if every producer keys by model.
    rekey_unkeyed: bool = True
    coalesce: bool = True  # merge same-model requests of one poll for engines whose deltas add up
    max_forget_items: int = Field(100_000, ge=1)
    # Progress events of long requests (O3 training epochs) on the results topic, marked by the header
    # unlearnd.event=progress and without a `status`; the one result per request still follows. `publish --wait`
    # shows them. Turn off for consumers that cannot skip them.
    progress_events: bool = True


class State(_Section):
    dir: Path = Path("var")  # ledger and artifacts live here unless set separately
    ledger: Path | None = None
    artifacts: Path | None = None
    ledger_synchronous: Literal["FULL", "NORMAL"] = "FULL"  # FULL survives power loss, NORMAL only crashes
    # A PostgreSQL ledger shared by several replicas, e.g. "postgresql://unlearnd@db:5432/unlearnd?sslmode=require"
    # (no password in it: it is read from the variable named by ledger_password_env). Unset: the SQLite file.
    ledger_url: str | None = None
    ledger_password_env: str = "UNLEARND_LEDGER_PASSWORD"
    # Further libpq connection parameters, passed through: sslmode, sslrootcert, sslcert, sslkey, connect_timeout...
    ledger_options: dict[str, str | int] = {}
    ledger_pool_min: int = Field(1, ge=1)
    ledger_pool_max: int = Field(4, ge=1)  # the engine thread, the poll thread, the isolated child has its own

    @field_validator("ledger_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (leave it unset for the embedded SQLite ledger)")
        if url and ":" in url.split("://", 1)[1].split("@", 1)[0] and "@" in url:
            raise ValueError("must not hold a password: set it in the variable named by state.ledger_password_env")
        return url or None

    @property
    def ledger_path(self) -> Path:
        return self.ledger or self.dir / "ledger.sqlite3"

    @property
    def artifacts_path(self) -> Path:
        return self.artifacts or self.dir / "artifacts"


class Metrics(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)  # 0 picks a free port (tests)


class Serve(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535)
    max_new_tokens: int = Field(64, ge=1)
    # The router's cut: an adapter whose gate weight is below this stays off for the input. Higher = fewer
    # false activations on look-alike inputs, fewer held-out paraphrases caught (bench/router.py, "gate_layers").
    min_weight: float = Field(0.45, ge=0.0, le=1.0)
    # Cosine by which an input must be nearer to an applied request's texts than to any near request whose gate
    # stays off; what keeps many similar requests from adding up their false activations (detector/router.py).
    margin: float = Field(0.06, ge=0.0, le=1.0)
    # An applied adapter's request must have the input's support: its mean cosine to the request's 2 nearest texts
    # at least this (or one text a near-copy, cosine >= 0.9). Keeps same-template questions about somebody else
    # off the adapter; 0 turns it off (detector/router.py).
    min_support: float = Field(0.78, ge=0.0, le=1.0)
    # A chat request is routed on its last user turn and on that turn after up to this many earlier user turns
    # (a follow-up names its subject in an earlier turn); 0 = the last turn only (detector/inputs.py).
    context_turns: int = Field(1, ge=0, le=16)
    # Texts whose router features serve keeps (about 9 KiB each with MiniLM): a chat resends its earlier turns with
    # every request, and a turn found here is not encoded again; 0 = encode every text every time
    # (detector/feature_cache.py).
    feature_cache_entries: int = Field(2048, ge=0)
    # Seconds between reconciles of the served adapters with the ledger (besides one at every adapters-topic
    # event); /healthz turns unavailable when the ledger and the topic both went silent (daemon/adapter_state.py).
    reconcile_s: float = Field(10.0, gt=0)
    # The largest HTTP request body serve reads; a larger one is answered 413 before it is read whole. A request's
    # text is capped at 100,000 characters (daemon/openai_api.py), a few hundred KiB even when JSON escapes every
    # character (daemon/body_limit.py).
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)


class Logging(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False  # one JSON object a line, for log shippers


class Bootstrap(_Section):
    """How to build a model on first start when the store has no version of it yet."""

    # "images": the demo image collection (MNIST canvases) and the unconditional DDPM its erasures run on.
    recipe: Literal["none", "classifier", "causal_lm", "ddpm", "images"] = "none"
    # "start": built before the daemon consumes (a start waits for it); "background": built in a background thread
    # once the daemon is consuming, and requests for the model wait (the pipeline pauses) until it is ready.
    # Default: "background" for diffusion and images models (minutes of training), "start" for the others.
    when: Literal["start", "background"] | None = None
    dataset: Literal["mnist", "digits"] = "mnist"
    arch: Literal["mlp", "cnn"] = "mlp"
    hidden: list[PositiveInt] = [256, 128]
    epochs: int = Field(15, ge=1)
    gr_alpha: float = Field(0.005, ge=0)  # IAU's gradient-restriction weight
    seed: int = 0
    source: str | None = None  # causal_lm: a transformers directory, or "smollm2" for the bundled GGUF
    # ddpm and images: the UNet (adapters.diffusion.ddpm.DDPMSpec keys, e.g. resolution, channels,
    # attention_levels) and its training (adapters.diffusion.training.TrainConfig keys, e.g. steps, batch_size,
    # lr); ddpm only: the judge's epochs and the per-version recognition samples
    # (adapters.diffusion.measures.SampleSettings keys). Empty = the demo recipe's own values.
    ddpm: dict[str, Any] = {}
    train: dict[str, Any] = {}
    judge_epochs: int = Field(20, ge=1)
    measure: dict[str, Any] = {}
    # images (adapters/images/demo.py Recipe): canvases stored in the demo collection (ids canvas-0000, ...) and
    # distinct canvases the DDPM trains on. Unset = the recipe's own values.
    collection_size: int | None = Field(None, ge=1)
    train_canvases: int | None = Field(None, ge=1)


class Model(_Section):
    kind: Literal["classifier", "causal_lm", "diffusion", "images"]
    method: str | None = None  # default method for this model's requests; None = the kind's default
    # Default method per forget kind, ahead of `method`, for requests that name none, e.g. {class = "salun"}.
    # Merged over DEFAULT_METHOD_BY_FORGET; keys are the forget kinds the model kind accepts (FORGET_KINDS).
    method_by_forget: dict[str, str] = {}
    # Methods a request may name per forget kind besides its default (which is always allowed), e.g.
    # {sample_ids = ["salun"]}. A request naming any other is refused (`method_not_allowed`): the defaults serve
    # each forget kind with the method measured to match retraining on it (README, classifier benchmark), and the
    # operator, not the requester, decides to serve another on their model. Keys as method_by_forget.
    allowed_methods: dict[str, list[str]] = {}
    bootstrap: Bootstrap = Bootstrap()
    # Engine settings for this model only, per method, over [methods.<method>]: e.g. [models.x.methods.salun]
    # steps = 50. Keys are the engine's Config fields for this model's kind.
    methods: dict[str, dict[str, Any]] = {}
    # Where the model, its engines, the detector encoder and serving run (adapters.devices): "auto" (a CUDA GPU
    # when torch sees one, else the CPU), "cpu", "cuda", "cuda:N"; and the weights' precision (causal_lm; the other
    # kinds take float32 only, ModelKind.dtypes). Both are checked at start-up (ModelRegistry.check_methods).
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # images: the collection's folder (PNG + index.json, adapters/images/collection.py), relative to the config
    # file. Unset: <artifacts>/<model>/collection, where bootstrap.recipe = "images" builds the demo one.
    collection: Path | None = None
    # images: seconds an erased image's original is kept (under <artifacts>/<model>/originals) for review or
    # restore by an operator before it is deleted. 0, the default: deleted as soon as the erasure is durable.
    retain_originals_s: float = Field(0.0, ge=0)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @property
    def bootstraps_in_background(self) -> bool:
        return (self.bootstrap.when or DEFAULT_BOOTSTRAP_WHEN[self.kind]) == "background"

    def default_method(self, forget_kind: str | None = None) -> str:
        """The method for a request of `forget_kind` that names none."""
        return self.method_by_forget.get(forget_kind or "") or self.method or DEFAULT_METHOD[self.kind]

    def methods_served(self, forget_kind: str) -> list[str]:
        """The methods a request of `forget_kind` may name: its default first, then those the operator allowed."""
        default = self.default_method(forget_kind)
        return [default, *(m for m in self.allowed_methods.get(forget_kind, ()) if m != default)]


class Config(_Section):
    kafka: Kafka = Kafka()
    requests: Requests = Requests()
    state: State = State()
    metrics: Metrics = Metrics()
    serve: Serve = Serve()
    logging: Logging = Logging()
    models: dict[str, Model] = {}
    # Per-method engine settings, e.g. [methods.iau] lr = 1e-3. A method with engines for several model kinds
    # (salun) takes its first kind's keys at the top and the others' in a sub-table named after the kind:
    # [methods.salun] for classifiers, [methods.salun.diffusion] for diffusion models.
    methods: dict[str, dict[str, Any]] = {}
    _source: Path | None = PrivateAttr(None)  # the file it was read from (None: defaults and environment only)

    def model(self, name: str) -> Model:
        return self.models[name]

    @property
    def source(self) -> Path | None:
        return self._source


DEFAULT_METHOD = {"classifier": "iau", "causal_lm": "o3", "diffusion": "salun", "images": "attentive_eraser"}
#: Per model kind, the forget kinds whose default is not the model's `method`: a whole class goes to SalUn, which
#: erases it (bench/classifier.py, "class" scenario); IAU's single step is for samples.
DEFAULT_METHOD_BY_FORGET: dict[str, dict[str, str]] = {"classifier": {"class": "salun"}, "causal_lm": {},
                                                       "diffusion": {}, "images": {}}
#: The forget kinds each model kind accepts (the keys `method_by_forget` may use).
FORGET_KINDS = {"classifier": ("sample_ids", "class"), "causal_lm": ("texts", "qa"), "diffusion": ("class",),
                "images": ("image",)}
#: When a model without a version is built, per kind (Bootstrap.when): a DDPM trains for minutes.
DEFAULT_BOOTSTRAP_WHEN = {"classifier": "start", "causal_lm": "start", "diffusion": "background",
                          "images": "background"}


class ConfigError(ValueError):
    pass


def locate(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file `load` reads: `path`, else $UNLEARND_CONFIG, else ./config.toml (which may not exist)."""
    environ = os.environ if env is None else env
    return Path(path or environ.get("UNLEARND_CONFIG", DEFAULT_CONFIG)).absolute()


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read config.toml (or `path`, or $UNLEARND_CONFIG), apply environment overrides, validate."""
    environ = os.environ if env is None else env
    path = locate(path, environ)
    data: dict[str, Any] = {}
    if path.is_file():
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    elif path.name != DEFAULT_CONFIG or "UNLEARND_CONFIG" in environ:
        raise ConfigError(f"config file {path} not found")
    try:
        overrides = config_env.apply(data, environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    while True:
        try:
            config = Config.model_validate(data)
            break
        except ValidationError as exc:
            errors = exc.errors()
        if not config_env.retype_as_text(data, overrides, errors):
            problems = "; ".join(f"{'.'.join(loc)}: {e['msg']}{config_env.source_of(loc, overrides)}"
                                 for e in errors for loc in [tuple(map(str, e["loc"]))])
            raise ConfigError(f"invalid configuration ({path}): {problems}")
    for name, model in config.models.items():
        model.method = model.method or DEFAULT_METHOD[model.kind]
        model.method_by_forget = {**DEFAULT_METHOD_BY_FORGET[model.kind], **model.method_by_forget}
        _check_methods(name, model)
    if path.is_file():
        config._source = path
    base = path.parent if path.is_file() else Path.cwd()
    state = config.state
    state.dir = base / state.dir  # an absolute path stays as it is
    state.ledger = base / state.ledger if state.ledger else None
    state.artifacts = base / state.artifacts if state.artifacts else None
    for model in config.models.values():
        model.collection = base / model.collection if model.collection else None
    return config


def _check_methods(name: str, model: Model) -> None:
    """A model's default methods name known engines, keyed by forget kinds the model kind accepts. Whether an
    engine applies to the model kind is checked when the daemon starts (ModelRegistry.check_methods)."""
    for table in ("method_by_forget", "allowed_methods"):
        unknown_kinds = set(getattr(model, table)) - set(FORGET_KINDS[model.kind])
        if unknown_kinds:
            raise ConfigError(f"models.{name}.{table}: {sorted(unknown_kinds)} not forget kinds of a "
                              f"{model.kind} model (known: {list(FORGET_KINDS[model.kind])})")
    for key, method in [("method", model.method), *((f"method_by_forget.{k}", m)
                                                      for k, m in model.method_by_forget.items()),
                        *((f"allowed_methods.{k}", m) for k, ms in model.allowed_methods.items() for m in ms)]:
        if method not in engine_names():
            raise ConfigError(f"models.{name}.{key}: unknown method {method!r} (known: {engine_names()})")


def bootstrap_servers(cfg: Config) -> str:
    """Where clients connect: the embedded broker's loopback port, or the configured cluster."""
    k = cfg.kafka
    return f"127.0.0.1:{k.embedded_port}" if k.bootstrap_servers == "embedded" else k.bootstrap_servers
