"""`unlearnd versions ...` and `unlearnd adapters ...`: inspect the changes deletions made, roll them back or restore them.

Both read and write the ledger directly, so they work whether or not the daemon is running; every rollback and
restore is recorded in the audit trail and announced on the adapters topic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from daemon.cli_common import (ConfigOpt, JsonOpt, announce, console, emit, fmt, load_config, open_ledger,
                               print_metrics, when)

versions_app = typer.Typer(help="Model versions (classifiers): list, show, roll back.", no_args_is_help=True)
adapters_app = typer.Typer(help="Unlearning adapters (language models): list, show, roll back, restore, export.",
                           no_args_is_help=True)


def _artifact_dict(a) -> dict:
    return {"id": a.id, "model": a.model, "kind": a.kind, "parent": a.parent, "request_id": a.request_id,
            "created": when(a.created_at), "active": a.active, "sha256": a.sha256, "path": a.path,
            "metrics": a.metrics}



@versions_app.command("list")
def versions_list(model: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The model's versions, oldest first; `active` marks the head that serves."""
    ledger = open_ledger(load_config(config))
    rows = [_artifact_dict(a) for a in ledger.list_artifacts(model, "version")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    emit(rows, ["id", "parent", "active", "request_id", "created", "sha256"], as_json, f"versions of {model}")


@versions_app.command("show")
def versions_show(version_id: str, model: Annotated[Optional[str], typer.Option(help="Model (if ids clash).")] = None,
                  as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One version: lineage, request, hash, measures, forgotten sample count."""
    ledger = open_ledger(load_config(config))
    a = ledger.get_artifact(model, version_id) if model else ledger.find_artifact(version_id)
    if a is None or a.kind != "version":
        console.print(f"[red]no version {version_id}[/red]")
        raise typer.Exit(1)
    d = _artifact_dict(a)
    d["lineage"] = [x.id for x in ledger.lineage(a.model, a.id)]
    d["forgotten_samples"] = len(ledger.forgotten_ids(a.model, a.id))
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return
    for k in ("id", "model", "active", "parent", "lineage", "request_id", "created", "sha256", "path",
              "forgotten_samples"):
        console.print(f"[bold]{k}[/]: {fmt(d[k]) if not isinstance(d[k], list) else ' <- '.join(d[k])}")
    print_metrics(d["metrics"])


@versions_app.command("rollback")
def versions_rollback(model: str, to: Annotated[str, typer.Option("--to", help="Version id to restore.")],
                      reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")] = "operator rollback",
                      as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Make an earlier version the head again (bit-exact weights); recorded in the ledger and announced.

    Samples forgotten by the versions after it are no longer forgotten by the served model: the ledger keeps
    them, and `requests list` shows which requests they came from, so they can be re-issued."""
    from adapters.store import ArtifactStore
    from daemon.models import ModelRegistry

    cfg = load_config(config)
    ledger = open_ledger(cfg)
    previous = ledger.head(model)
    registry = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger)
    try:
        row = registry.rollback(model, to, reason=reason)
    except (KeyError, RuntimeError) as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    announced = announce(cfg, model, row.id, "rolled_back", {"kind": "version", "from": previous.id if previous
                                                              else None, "reason": reason, "sha256": row.sha256})
    out = {"model": model, "head": row.id, "from": previous.id if previous else None, "announced": announced}
    print(json.dumps(out)) if as_json else console.print(
        f"{model}: head {out['from']} -> [bold]{row.id}[/]" + ("" if announced else
                                                            " [yellow](recorded; announcement failed: broker down)[/]"))



# --- adapters -----------------------------------------------------------------------------------------------


def _adapter(ledger, adapter_id: str, model: str | None):
    a = ledger.get_artifact(model, adapter_id) if model else ledger.find_artifact(adapter_id)
    if a is None or a.kind != "adapter":
        console.print(f"[red]no adapter {adapter_id}[/red]")
        raise typer.Exit(1)
    return a


ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model (if adapter ids clash across models).")]


@adapters_app.command("list")
def adapters_list(model: Annotated[Optional[str], typer.Argument()] = None, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Adapters, oldest first; `active` ones are applied by serving (where the router says so)."""
    rows = [_artifact_dict(a) for a in open_ledger(load_config(config)).list_artifacts(model, "adapter")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    emit(rows, ["id", "model", "active", "request_id", "created", "sha256"], as_json, "adapters")


@adapters_app.command("show")
def adapters_show(adapter_id: str, model: ModelOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One adapter: request, size, rank, measures, and its overlap with every other active adapter."""
    from adapters import lora_set

    ledger = open_ledger(load_config(config))
    a = _adapter(ledger, adapter_id, model)
    d = _artifact_dict(a)
    path = Path(a.path)
    d["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    d["rank"] = json.loads((path / "adapter_config.json").read_text()).get("r")
    others = {o.id: o.path for o in ledger.list_artifacts(a.model, "adapter") if o.active and o.id != a.id}
    d["orthogonality"] = lora_set.orthogonality_report({a.id: a.path, **others}) if others else None
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return
    for k in ("id", "model", "active", "request_id", "created", "sha256", "path", "size_bytes", "rank"):
        console.print(f"[bold]{k}[/]: {fmt(d[k])}")
    if d["orthogonality"]:
        console.print(f"[bold]max |cos| with other active adapters[/]: {d['orthogonality']['max_cosine']:.4f}")
    print_metrics(d["metrics"])


def _set_adapter(adapter_id: str, model: str | None, active: bool, reason: str, as_json: bool,
                 config: Path | None) -> None:
    from adapters.store import ArtifactStore
    from daemon.models import ModelRegistry

    cfg = load_config(config)
    ledger = open_ledger(cfg)
    a = _adapter(ledger, adapter_id, model)
    try:
        row = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).set_adapter(
            a.model, a.id, active, reason=reason)
    except (KeyError, RuntimeError) as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    event = "restored" if active else "rolled_back"
    announced = announce(cfg, a.model, a.id, event, {"kind": "adapter", "reason": reason, "sha256": row.sha256,
                                                     "path": row.path})
    out = {"model": a.model, "adapter_id": a.id, "active": active, "announced": announced}
    print(json.dumps(out)) if as_json else console.print(f"{a.model}: adapter {a.id} {event}"
                                                         + ("" if announced else " [yellow](not announced)[/]"))


@adapters_app.command("rollback")
def adapters_rollback(adapter_id: str, model: ModelOpt = None,
                      reason: Annotated[str, typer.Option()] = "operator rollback", as_json: JsonOpt = False,
                      config: ConfigOpt = None) -> None:
    """Deactivate an adapter (the base and other adapters untouched); recorded and announced."""
    _set_adapter(adapter_id, model, False, reason, as_json, config)


@adapters_app.command("restore")
def adapters_restore(adapter_id: str, model: ModelOpt = None,
                     reason: Annotated[str, typer.Option()] = "operator restore", as_json: JsonOpt = False,
                     config: ConfigOpt = None) -> None:
    """Re-activate a rolled-back adapter (after checking its files against the recorded sha256)."""
    _set_adapter(adapter_id, model, True, reason, as_json, config)


@adapters_app.command("export")
def adapters_export(adapter_id: str, directory: Path, model: ModelOpt = None, config: ConfigOpt = None) -> None:
    """Copy an adapter in PEFT's own layout (loadable by peft, vLLM, LoRAX without unlearnd)."""
    import shutil

    a = _adapter(open_ledger(load_config(config)), adapter_id, model)
    shutil.copytree(a.path, directory, dirs_exist_ok=True)
    console.print(f"exported {a.id} to {directory}")


