"""Every Prometheus metric unlearnd exports, defined in one place.

Conventions (prometheus-client): `unlearnd_<noun>_total` counters, `_seconds` histograms, labels with bounded
values only: model names come from config, methods and statuses and DLQ reasons from fixed sets. A request id is
never a label.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from daemon.schema import DeadLetterReason

# Request statuses and DLQ reasons are closed sets; dashboards and alerts depend on them.
# "rekeyed": an unkeyed request re-published keyed by its model (its owner applies it).
STATUSES = ("applied", "rejected", "failed", "duplicate", "rekeyed")
DLQ_REASONS = tuple(reason.value for reason in DeadLetterReason)
# Conditions of the environment that pause the pipeline (daemon/transient.py); isolated-run outcomes.
PAUSE_REASONS = ("disk_full", "ledger_busy", "io_error", "bootstrapping")
ISOLATED_OUTCOMES = ("ok", "engine_error", "engine_died")

REQUESTS = Counter("unlearnd_requests_total", "Deletion requests handled, by outcome.", ["model", "method", "status"])
REQUEST_SECONDS = Histogram(
    "unlearnd_request_duration_seconds", "Wall time from poll to durable result, per applied request.",
    ["model", "method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SHORT_OF_CRITERION = Counter(
    "unlearnd_requests_short_of_criterion_total", "Applied requests whose change stopped short of its method's own "
    "test of forgetting (result measure criterion_met = 0), e.g. a step capped by IAU's retain-accuracy guard.",
    ["model", "method"],
)
DLQ = Counter("unlearnd_dlq_total", "Messages sent to the dead-letter topic, by reason.", ["reason"])
ENGINE_RETRIES = Counter(
    "unlearnd_engine_retries_total", "Engine attempts that failed and were retried.", ["model", "method"]
)
CONSUMER_LAG = Gauge("unlearnd_consumer_lag", "Messages behind the end of each assigned partition (from positions).",
                     ["topic", "partition"])
MODEL_VERSIONS = Gauge("unlearnd_model_versions", "Model versions recorded in the ledger.", ["model"])
ACTIVE_ADAPTERS = Gauge("unlearnd_active_adapters", "Unlearning adapters currently active.", ["model"])
# Rollbacks are done by the CLI (another process), so the daemon counts them from the ledger's audit trail.
ROLLBACKS = Counter("unlearnd_rollbacks_total", "Rollbacks of versions or adapters (event=rolled_back) and "
                    "restores of adapters (event=restored), from the ledger's audit trail.", ["model", "event"])
BOOTSTRAPPING = Gauge("unlearnd_bootstrapping", "1 while the daemon builds or loads its models at start-up "
                      "(the first start trains them), else 0; `unlearnd health` reports it.")
BROKER_CONNECTED = Gauge("unlearnd_broker_connected", "1 while the daemon can reach the Kafka cluster, else 0.")
BROKER_DISCONNECTS = Counter("unlearnd_broker_disconnects_total", "Times the daemon lost the Kafka cluster.")
GROUP_REJOINS = Counter("unlearnd_group_rejoins_total", "Times the daemon left and rejoined its consumer group "
                        "because it held no partition while requests waited (kafka.unassigned_rejoin_s).")
LAST_APPLIED = Gauge("unlearnd_last_applied_timestamp_seconds", "Unix time of the last applied request.", ["model"])
IN_FLIGHT = Gauge("unlearnd_requests_in_flight", "Requests polled but not yet committed.")
PAUSED = Gauge("unlearnd_paused", "1 while the pipeline is paused by a transient condition (a full disk, a busy "
               "ledger), else 0; requests wait and are retried, none is failed.", ["reason"])
TRANSIENT_ERRORS = Counter("unlearnd_transient_errors_total", "Transient conditions met; each pauses the pipeline "
                           "and retries the message.", ["kind"])
ISOLATED_RUNS = Counter("unlearnd_isolated_runs_total", "Requests that were in hand at a crash, applied in a child "
                        "process, by outcome (engine_died counts against the request).", ["outcome"])
REDELIVERED = Counter("unlearnd_redelivered_total", "Redelivered records already answered before a crash, "
                      "skipped (not answered twice).")
LEDGER_CONFLICTS = Counter("unlearnd_ledger_conflicts_total", "Races lost to another replica sharing the ledger "
                           "(HeadMoved: rebuilt on the new head; AppliedElsewhere: answered from the ledger).",
                           ["model", "conflict"])
# Exported at 0 from the start, so alerts and dashboards see the series (and increase() sees the first one).
for _reason in PAUSE_REASONS:
    PAUSED.labels(_reason).set(0)
    TRANSIENT_ERRORS.labels(_reason)
for _outcome in ISOLATED_OUTCOMES:
    ISOLATED_RUNS.labels(_outcome)

# Serving (unlearnd serve): routing decisions and generation.
ROUTER_SECONDS = Histogram("unlearnd_router_latency_seconds", "Time to route one input (embed, search, score).",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
ROUTER_DECISIONS = Counter("unlearnd_router_decisions_total", "Routed inputs, by whether any adapter was applied.",
                           ["model", "hit"])
ROUTER_FEATURE_CACHE = Counter("unlearnd_router_feature_cache_total", "Texts the router looked up in its feature "
                               "cache ([serve] feature_cache_entries), by whether they were there.", ["result"])
for _result in ("hit", "miss"):
    ROUTER_FEATURE_CACHE.labels(_result)
GENERATION_SECONDS = Histogram("unlearnd_generation_seconds", "Time to generate one completion.", ["model"],
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def serve(host: str, port: int) -> int:
    """Expose /metrics; returns the bound port (port 0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
