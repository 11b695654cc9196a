"""The `unlearnd` command: run the daemon, serve, publish requests, and inspect what it did.

Every command that prints a result prints a table or text, or strict JSON with `--json` for scripts. Commands
that only read open the ledger directly and work whether or not the daemon is running. `versions` and `adapters`
live in cli_artifacts.py.

Exit codes: 0 success; 1 the command's answer is negative (unhealthy, rejected, nothing found, cluster
unreachable); 2 bad usage or configuration; 3 `publish --wait` saw no result in time (the request stays queued).
Expected failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon import config as config_mod
from daemon.cli_artifacts import adapters_app, versions_app
from daemon.cli_common import (
    CLIError,
    ConfigOpt,
    JsonOpt,
    check_kafka_secrets,
    console,
    dumps,
    emit,
    err_console,
    fail,
    fmt,
    load_config,
    open_ledger,
    print_json,
    print_metrics,
    registered_model,
    shown,
    when,
)
from daemon.cli_images import images_app
from daemon.cli_ledger import ledger_app
from daemon.cli_publish import publish
from daemon.cli_sample import sample
from daemon.config import bootstrap_servers
from daemon.ledger import TERMINAL
from daemon.logs import setup_logging

if TYPE_CHECKING:
    from daemon.ledger import Ledger
    from daemon.ledger_schema import RequestRow

app = typer.Typer(help="unlearnd: make deployed models forget data on request.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
requests_app = typer.Typer(help="Deletion requests recorded in the ledger.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
app.add_typer(requests_app, name="requests")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
app.add_typer(ledger_app, name="ledger")
app.add_typer(images_app, name="images")
app.command()(sample)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"unlearnd {version('unlearnd')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """unlearnd: make deployed models forget data on request."""


def main() -> None:
    """The `unlearnd` entry point: expected failures become one line on stderr and an exit code."""
    from daemon.ledger_backends import LedgerUnreachable

    try:
        app()
    except (CLIError, LedgerUnreachable) as exc:
        err_console.print(f"[red]unlearnd: {shown(exc)}[/red]", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "code", 1))


# --- the daemon ---------------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it cleanly, also during first-start training)."""
    import logging

    cfg = load_config(config)
    setup_logging(cfg.logging)
    from daemon.app import Daemon, StartupError
    from daemon.state_lock import StateLocked

    logging.getLogger("unlearnd").info("config %s; state in %s", cfg.source, cfg.state.dir)
    try:
        code = Daemon(cfg).run()
    except (StartupError, StateLocked) as exc:  # StateLocked: one state directory, one daemon
        fail(str(exc))
    except config_mod.ConfigError as exc:  # a model's default method does not apply to its kind
        fail(str(exc), 2)
    raise typer.Exit(code)


@app.command()
def health(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Exit 0 if the daemon's metrics endpoint answers, it has finished start-up and is connected to the broker
    (for probes); otherwise say why (not answering, bootstrapping, broker unreachable) and exit 1."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    cfg = load_config(config)
    if not cfg.metrics.enabled or cfg.metrics.port == 0:
        fail("health reads the daemon's metrics endpoint, and this config gives it none to read ("
             + ("metrics.enabled = false" if not cfg.metrics.enabled else "metrics.port = 0: a free port each start")
             + "): set metrics.enabled = true and a fixed metrics.port", 2)
    host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "::") else cfg.metrics.host
    url = f"http://{host}:{cfg.metrics.port}/metrics"
    try:
        body = urllib.request.urlopen(url, timeout=3).read().decode()
    except OSError as exc:
        status, detail = "unhealthy", f"metrics endpoint {url} not answering ({exc})"
    else:
        values = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples if not s.labels}
        if values.get("unlearnd_bootstrapping") == 1.0:
            status, detail = "bootstrapping", "building or loading its models (the first start trains them)"
        elif values.get("unlearnd_broker_connected") != 1.0:
            status, detail = "unhealthy", "not connected to the Kafka cluster"
        else:
            status, detail = "healthy", "consuming requests"
    if as_json:
        print_json({"status": status, "detail": detail, "metrics_url": url})
    else:
        colour = {"healthy": "green", "bootstrapping": "yellow"}.get(status, "red")
        console.print(f"[{colour}]{status}[/{colour}]: {detail}", highlight=False)
    raise typer.Exit(0 if status == "healthy" else 1)


def _lm(cfg: config_mod.Config, model: str | None) -> str:
    """The causal_lm model `serve` and `route` work on: the one named, else the only one registered."""
    if model is not None:
        return registered_model(cfg, model, "causal_lm", takes="serve and route take")
    lms = [name for name, m in cfg.models.items() if m.kind == "causal_lm"]
    if len(lms) != 1:
        fail(f"name the model: {cfg.source} has {len(lms)} causal_lm models {lms}", 2)
    return lms[0]


def _listen(host: str, port: int) -> socket.socket:
    """The bound socket `serve` will serve on, taken before the model loads (minutes), so a port in use or an address
    that is not this machine's is said at once, and nothing can take the port meanwhile."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait on TIME_WAIT
        sock.bind(address)
    except OSError as exc:  # socket.gaierror too: a host name that does not resolve
        if sock is not None:
            sock.close()
        hint = (": is another unlearnd serve running? Stop it, or pass --port or set serve.port"
                if exc.errno == errno.EADDRINUSE else "")
        fail(f"cannot serve on {host}:{port} ({exc.strerror or exc}){hint}", 2)
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="A registered causal_lm model (default: the only one).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default \\[serve] host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default \\[serve] port).")] = None,
    route_only: Annotated[bool, typer.Option("--route-only", help="Serve /v1/route without loading the LM.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve the model over HTTP, routing each input through the unlearning adapters that apply to it."""
    cfg = load_config(config)
    name = _lm(cfg, model)
    sock = _listen(host or cfg.serve.host, cfg.serve.port if port is None else port)
    setup_logging(cfg.logging)
    from daemon import serve as serve_mod

    serve_mod.serve(cfg, name, sock, route_only=route_only)


@app.command()
def route(
    text: Annotated[str, typer.Argument(help="An input to route.")],
    model: Annotated[str | None, typer.Option(help="A registered causal_lm model (default: the only one).")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Which adapters an input would get, and why (per-adapter scores), from the adapters topic's state."""
    cfg = load_config(config)
    name = _lm(cfg, model)
    from kafka.errors import KafkaError
    from transformers.utils import logging as hf_logging

    from daemon import serve as serve_mod

    hf_logging.disable_progress_bar()  # the encoder's loading bar is noise around one answer
    try:
        decision = serve_mod.route_text(cfg, name, text)
    except KafkaError as exc:
        fail(f"cannot read {cfg.kafka.topics.adapters} from {bootstrap_servers(cfg)} ({type(exc).__name__}: {exc})")
    if as_json:
        print_json(decision)
    else:
        console.print_json(dumps(decision))


app.command()(publish)


# --- requests -----------------------------------------------------------------------------------------------


def _request_dicts(ledger: Ledger, rows: list[RequestRow]) -> list[dict[str, Any]]:
    """Requests as the CLI shows them: an applied one whose change a rollback has since taken out of what its
    model serves shows as `rolled_back` (the ledger keeps `applied`, what happened; this is what holds now)."""
    served: dict[str, frozenset[str]] = {}

    def status(r: RequestRow) -> str:
        if r.status != "applied" or not r.model:
            return r.status
        if r.model not in served:
            served[r.model] = ledger.served_artifacts(r.model)
        return "rolled_back" if ledger.rolled_back(r, served[r.model]) else r.status

    return [_request_dict(r, status(r)) for r in rows]


def _request_dict(r: RequestRow, status: str) -> dict[str, Any]:
    return {"request_id": r.request_id, "model": r.model, "method": r.method, "status": status,
            "attempts": r.attempts, "engine_failures": r.engine_failures, "artifact_id": r.artifact_id,
            "forget_kind": r.forget_kind, "forget_count": r.forget_count, "subject": r.subject, "reason": r.reason,
            "error": r.error,
            "received": when(r.received_at), "completed": when(r.completed_at), "duration_s": r.duration_s,
            "body_sha256": r.body_sha256, "source": r.source, "metrics": r.metrics}


#: A request's statuses in the ledger: processing, readmitted (an operator's retry), then one of ledger.TERMINAL;
#: and rolled_back, which the CLI derives for an applied request whose change a rollback undid (_request_dicts).
REQUEST_STATUSES = ("processing", "readmitted", *TERMINAL, "rolled_back")


def _status(value: str | None) -> str | None:
    if value is not None and value not in REQUEST_STATUSES:
        raise typer.BadParameter(f"{value!r} is not a request status; one of: {', '.join(REQUEST_STATUSES)}")
    return value


@requests_app.command("list")
def requests_list(model: Annotated[str | None, typer.Option(help="A registered model (default: all).")] = None,
                  status: Annotated[str | None, typer.Option(callback=_status, help="Only requests in this status: "
                                                             f"{', '.join(REQUEST_STATUSES)}.")] = None,
                  limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
                  as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Recent requests, newest first."""
    cfg = load_config(config)
    if model is not None:
        registered_model(cfg, model)
    ledger = open_ledger(cfg)
    if status == "rolled_back":  # derived, not stored: applied requests whose change is no longer served
        rows = [r for r in _request_dicts(ledger, ledger.list_requests(model, "applied", None))
                if r["status"] == status][:limit]
    else:
        rows = _request_dicts(ledger, ledger.list_requests(model, status, limit))
    emit(rows, ["request_id", "model", "method", "status", "artifact_id", "forget_count", "reason", "received",
                 "duration_s"], as_json, "requests")


@requests_app.command("show")
def requests_show(request_id: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One request with its measures (no raw forget data is ever stored)."""
    ledger = open_ledger(load_config(config))
    r = ledger.get_request(request_id)
    if r is None:
        fail(f"no request {request_id}")
    [d] = _request_dicts(ledger, [r])
    if as_json:
        print_json(d)
        return
    for k, v in d.items():
        if k != "metrics":
            console.print(f"[bold]{k}[/]: {fmt(v)}")
    print_metrics(d["metrics"])


@requests_app.command("retry")
def requests_retry(request_id: str,
                   reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "operator retry",
                   as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Re-admit a failed request after fixing its cause: re-published from its dead-letter copy, applied once."""
    from daemon import retry

    cfg = load_config(config)
    check_kafka_secrets(cfg)
    try:
        out = retry.readmit(cfg, open_ledger(cfg), bootstrap_servers(cfg), request_id, reason)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print_json(out)
    elif out["republished"]:
        console.print(f"re-admitted {request_id} and re-published it from {cfg.kafka.topics.dlq}")
    else:
        console.print(f"re-admitted {request_id}; no dead-letter copy on {cfg.kafka.topics.dlq} (retention? a "
                      "restarted embedded broker?): publish the original request again with the same request_id")


# --- models -------------------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Models in config.toml with their head version and counts from the ledger."""
    cfg = load_config(config)
    ledger = open_ledger(cfg)
    rows = []
    for name, spec in cfg.models.items():
        head = ledger.head(name)
        arts = ledger.list_artifacts(name)
        rows.append({"model": name, "kind": spec.kind, "method": spec.method, "head": head.id if head else None,
                     "versions": sum(a.kind == "version" for a in arts),
                     "active_adapters": sum(a.kind == "adapter" and a.active for a in arts),
                     "requests": len(ledger.list_requests(name, limit=1_000_000))})
    emit(rows, ["model", "kind", "method", "head", "versions", "active_adapters", "requests"], as_json, "models")


if __name__ == "__main__":
    main()
