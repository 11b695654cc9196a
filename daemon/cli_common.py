"""What every `unlearnd` command shares: config and ledger access, announcements, and output (tables or JSON)."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daemon import config as config_mod
from daemon.config import bootstrap_servers

if TYPE_CHECKING:
    from daemon.ledger import Ledger

console = Console()
err_console = Console(stderr=True)  # warnings that must not mix into --json output on stdout
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="config.toml (default: ./config.toml "
                                                   "or $UNLEARND_CONFIG)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


class CLIError(Exception):
    """An expected failure (bad input, nothing to act on, cluster unreachable): one line on stderr and an exit
    code, no traceback. `daemon.cli.main` prints it."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CLIError(message, code)


def load_config(path: Path | None) -> config_mod.Config:
    """The configuration every command uses; refuses to run on bare defaults when no config file is found
    (a daemon or CLI started in the wrong directory would otherwise work on an empty ./var of its own)."""
    source = config_mod.locate(path)
    if not source.is_file():
        default = not path and "UNLEARND_CONFIG" not in os.environ
        fail(f"no config file {source}" + ("; run from the directory that holds config.toml, pass --config FILE "
                                           "or set UNLEARND_CONFIG" if default else ""), 2)
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        fail(str(exc), 2)


def check_kafka_secrets(cfg: config_mod.Config) -> None:
    """Exit 2 with the problem when the configured Kafka secrets (CA and client certificate files, the password's
    environment variable) are not there, before a command talks to the broker."""
    from daemon import kafka_io  # kafka-python on import: only the commands that reach the broker pay for it

    try:
        kafka_io.check_secrets(cfg.kafka)
    except config_mod.ConfigError as exc:
        fail(str(exc), 2)


def registered_model(cfg: config_mod.Config, model: str, kind: str | None = None, *, takes: str = "") -> str:
    """`model` if the config registers it (and, with `kind`, it is of that kind); otherwise the one-line refusal,
    exit 2, before anything is read, loaded or written: an unknown name lists the registered ones, a model of
    another kind the registered models of `kind` (`takes` names what takes them, e.g. "serve and route take")."""
    spec = cfg.models.get(model)
    if spec is None:
        fail(f"unknown model {model!r}: {cfg.source} registers {', '.join(sorted(cfg.models)) or 'no models'}", 2)
    if kind is not None and spec.kind != kind:
        same = sorted(name for name, s in cfg.models.items() if s.kind == kind)
        fail(f"{model} is a {spec.kind} model; {takes} a {kind} model: {', '.join(same) or 'none registered'}", 2)
    return model


def open_ledger(cfg: config_mod.Config) -> Ledger:
    """The daemon's ledger; an error (never a new empty ledger) when the daemon has not run with this config."""
    from daemon.ledger import open_ledger

    path = cfg.state.ledger_path
    if not cfg.state.ledger_url and not path.is_file():
        fail(f"no ledger at {path}: the daemon has not run with {cfg.source} yet (`unlearnd run` creates it)")
    return open_ledger(cfg.state)


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null, which every parser accepts."""
    return json.dumps(_finite(value), allow_nan=False, default=str, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(value: Any) -> None:
    print(dumps(value, indent=2))


def emit(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str | None = None) -> None:
    if as_json:
        print_json(rows)
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*[fmt(row.get(c)) for c in columns])
    print_table(table)


def print_table(table: Table) -> None:
    """A table at its natural width: cells (ids above all) are never cut to fit a narrow terminal or a pipe."""
    natural = Console(width=100_000).measure(table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def fmt(value: Any) -> str:
    """A value as the console prints it (`shown`)."""
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "-"  # as in --json, where a measure that is not a number is null
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return shown(value)


# C0 and C1 controls, DEL, and the bidirectional-text controls
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(value: Any) -> str:
    """Text from outside (a requester's ids, names and subjects, a result event's reason) ready for the console:
    printed literally, never read as rich markup (`[/]` would crash the print, `[link=...]` hide a link), and with
    control characters spelled as escapes (`\\x1b`, `\\n`), so it cannot clear or recolour the terminal, forge a
    line, or reorder the text around it."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
    return escape(text)


def when(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else None



def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    colour = {"applied": "green", "rejected": "yellow", "failed": "red"}.get(result["status"], "white")
    receipt = result.get("receipt") or {}
    made = result.get("version") or result.get("adapter_id") or receipt.get("erasure")
    console.print(
        f"[bold {colour}]{shown(result['status'])}[/] {shown(result.get('request_id'))} on {shown(result.get('model'))}"
        + (f" with {shown(result['method'])}" if result.get("method") else "")
        + (f" -> {shown(made)}" if result["status"] == "applied" else "")
        + (" (already forgotten: nothing changed)" if result.get("changed") is False else "")
        + (f" ({result.get('duration_s'):.2f}s)" if result.get("duration_s") is not None else "")
    )
    if result.get("reason"):
        console.print(f"reason: {shown(result['reason'])}: {shown(result.get('error'))}")
    if receipt:
        console.print("receipt: " + "  ".join(f"{shown(k)}={shown(v)}" for k, v in receipt.items()), highlight=False)
    print_metrics(result.get("metrics") or {})


def print_metrics(m: dict[str, Any]) -> None:
    pairs = sorted({k[: -len("_before")] for k in m if k.endswith("_before")})
    if pairs:
        table = Table("measure", "before", "after")
        for name in pairs:
            table.add_row(shown(name), fmt(m.get(f"{name}_before")), fmt(m.get(f"{name}_after")))
        print_table(table)
    paired = {f"{name}_{when}" for name in pairs for when in ("before", "after")}
    rest = {k: v for k, v in m.items() if k not in paired}
    if rest:
        console.print("  ".join(f"{shown(k)}={fmt(v)}" for k, v in sorted(rest.items())))



def announce(cfg: config_mod.Config, model: str, artifact_id: str, event: str, payload: dict[str, Any]) -> bool:
    """Publish an adapters-topic event; the ledger is already updated, so failure is reported, not fatal."""
    from daemon import kafka_io

    try:
        producer = kafka_io.make_cli_producer(cfg.kafka, bootstrap_servers(cfg), max_block_ms=10_000)
        kafka_io.Outbox(producer, cfg.kafka).artifact_event(model, artifact_id, event, payload)
        producer.flush(10)
        producer.close()
        return True
    except Exception as exc:  # kafka-python raises several unrelated types for an unreachable cluster
        err_console.print(f"[yellow]could not announce on {cfg.kafka.topics.adapters}: {exc}[/yellow]")
        return False
