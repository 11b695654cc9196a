"""`unlearnd versions ...` and `unlearnd adapters ...`: inspect the changes deletions made, roll them back or
restore them.

Both read and write the ledger directly, so they work whether or not the daemon is running; every rollback and
restore is recorded in the audit trail and announced on the adapters topic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon.cli_common import (
    ConfigOpt,
    JsonOpt,
    announce,
    console,
    dumps,
    emit,
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

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.ledger import Ledger
    from daemon.ledger_schema import ArtifactRow

versions_app = typer.Typer(
    help="Model versions (classifiers, diffusion models): list, show, roll back.", no_args_is_help=True
)
adapters_app = typer.Typer(help="Unlearning adapters (language models): list, show, roll back, restore, export.",
                           no_args_is_help=True)


def _artifact_dict(a: ArtifactRow) -> dict[str, Any]:
    return {"id": a.id, "model": a.model, "kind": a.kind, "parent": a.parent, "request_id": a.request_id,
            "created": when(a.created_at), "active": a.active, "sha256": a.sha256, "path": a.path,
            "metrics": a.metrics}



def _artifact(cfg: Config, kind: str, artifact_id: str, model: str | None) -> tuple[Ledger, ArtifactRow]:
    """The ledger, and in it the version or adapter `artifact_id` of `model`, or of whichever model has one by that
    id: ids are only unique per model (every model's first change is v0001 or a0001), so one that several models
    have needs `--model`."""
    if model is not None:
        registered_model(cfg, model)
    ledger = open_ledger(cfg)
    if model is not None:
        a = ledger.get_artifact(model, artifact_id)
        found = [a] if a is not None and a.kind == kind else []
    else:
        found = [a for a in ledger.list_artifacts(kind=kind) if a.id == artifact_id]
    if not found:
        fail(f"no {kind} {artifact_id}" + (f" of {model}" if model else ""))
    if len(found) > 1:
        fail(f"{len(found)} models have a {kind} {artifact_id} ({', '.join(sorted(a.model for a in found))}): "
             "name one with --model", 2)
    return ledger, found[0]


@versions_app.command("list")
def versions_list(model: str, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The model's versions, oldest first; `active` marks the head that serves."""
    cfg = load_config(config)
    registered_model(cfg, model)
    rows = [_artifact_dict(a) for a in open_ledger(cfg).list_artifacts(model, "version")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    emit(rows, ["id", "parent", "active", "request_id", "created", "sha256"], as_json, f"versions of {model}")


@versions_app.command("show")
def versions_show(version_id: str, model: Annotated[str | None, typer.Option(help="Model (if ids clash).")] = None,
                  as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One version: lineage, request, hash, measures, forgotten sample count."""
    ledger, a = _artifact(load_config(config), "version", version_id, model)
    d = _artifact_dict(a)
    d["lineage"] = [x.id for x in ledger.lineage(a.model, a.id)]
    d["forgotten_samples"] = len(ledger.forgotten_ids(a.model, a.id))
    if as_json:
        print_json(d)
        return
    for k in ("id", "model", "active", "parent", "lineage", "request_id", "created", "sha256", "path",
              "forgotten_samples"):
        console.print(f"[bold]{k}[/]: {fmt(d[k]) if not isinstance(d[k], list) else ' <- '.join(map(shown, d[k]))}")
    print_metrics(d["metrics"])


@versions_app.command("rollback")
def versions_rollback(model: str, to: Annotated[str, typer.Option("--to", help="Version id to make the head.")],
                      reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")] = "operator rollback",
                      as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Make another version of the model the head (bit-exact weights); recorded in the ledger and announced. The
    head itself is refused (exit 1, nothing recorded).

    Samples forgotten by the versions after it are no longer forgotten by the served model: the ledger keeps
    them, and `requests list` shows which requests they came from, so they can be re-issued."""
    from adapters.store import ArtifactStore
    from daemon.models import ModelRegistry

    cfg = load_config(config)
    registered_model(cfg, model)
    ledger = open_ledger(cfg)
    previous = ledger.head(model)
    if previous is not None and previous.id == to:
        fail(f"{to} is already the head of {model}")
    registry = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger)
    try:
        row = registry.rollback(model, to, reason=reason)
    except (KeyError, RuntimeError) as exc:
        fail(exc.args[0])
    announced = announce(cfg, model, row.id, "rolled_back", {"kind": "version", "from": previous.id if previous
                                                              else None, "reason": reason, "sha256": row.sha256})
    out = {"model": model, "head": row.id, "from": previous.id if previous else None, "announced": announced}
    print(dumps(out)) if as_json else console.print(
        f"{model}: head {out['from']} -> [bold]{row.id}[/]" + ("" if announced else
                                                            " [yellow](recorded; announcement failed: broker down)[/]"))



# --- adapters -----------------------------------------------------------------------------------------------


ModelOpt = Annotated[str | None, typer.Option("--model", help="Model (if adapter ids clash across models).")]


@adapters_app.command("list")
def adapters_list(model: Annotated[str | None, typer.Argument()] = None, as_json: JsonOpt = False,
                  config: ConfigOpt = None) -> None:
    """Adapters, oldest first; `active` ones are applied by serving (where the router says so)."""
    cfg = load_config(config)
    if model is not None:
        registered_model(cfg, model)
    rows = [_artifact_dict(a) for a in open_ledger(cfg).list_artifacts(model, "adapter")]
    for r in rows:
        r["sha256"] = r["sha256"][:12]
    emit(rows, ["id", "model", "active", "request_id", "created", "sha256"], as_json, "adapters")


@adapters_app.command("show")
def adapters_show(adapter_id: str, model: ModelOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One adapter: request, size, rank, measures, and its overlap with every other active adapter."""
    from adapters.lm import lora_set

    ledger, a = _artifact(load_config(config), "adapter", adapter_id, model)
    d = _artifact_dict(a)
    path = Path(a.path)
    d["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    d["rank"] = json.loads((path / "adapter_config.json").read_text()).get("r")
    others = {o.id: o.path for o in ledger.list_artifacts(a.model, "adapter") if o.active and o.id != a.id}
    d["orthogonality"] = lora_set.orthogonality_report({a.id: a.path, **others}) if others else None
    if as_json:
        print_json(d)
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
    ledger, a = _artifact(cfg, "adapter", adapter_id, model)
    try:
        row = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).set_adapter(
            a.model, a.id, active, reason=reason)
    except (KeyError, RuntimeError) as exc:
        fail(exc.args[0])
    event = "restored" if active else "rolled_back"
    announced = announce(cfg, a.model, a.id, event, {"kind": "adapter", "reason": reason, "sha256": row.sha256,
                                                     "path": row.path})
    out = {"model": a.model, "adapter_id": a.id, "active": active, "announced": announced}
    print(dumps(out)) if as_json else console.print(f"{a.model}: adapter {a.id} {event}"
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
def adapters_export(adapter_id: str, directory: Path, model: ModelOpt = None, as_json: JsonOpt = False,
                    config: ConfigOpt = None) -> None:
    """Copy an adapter in PEFT's own layout (loadable by peft, vLLM, LoRAX without unlearnd), with an absolute
    base model path and a model card (README.md) that says how it must be served: routed, never always on."""
    import shutil

    cfg = load_config(config)
    _, a = _artifact(cfg, "adapter", adapter_id, model)
    shutil.copytree(a.path, directory, dirs_exist_ok=True)
    adapter_config = directory / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    base = Path(settings.get("base_model_name_or_path") or "")
    if not base.is_absolute():  # written before paths were absolute: relative to the config's directory
        base = (cfg.source.parent if cfg.source else Path.cwd()) / base
        settings["base_model_name_or_path"] = str(base)
        adapter_config.write_text(json.dumps(settings, indent=2))
    (directory / "README.md").write_text(model_card(a, base))
    out = {"adapter_id": a.id, "model": a.model, "request_id": a.request_id, "directory": str(directory.absolute()),
           "base_model_name_or_path": str(base), "files": sorted(str(f.relative_to(directory))
                                                                 for f in directory.rglob("*") if f.is_file())}
    print_json(out) if as_json else console.print(f"exported {a.id} to {out['directory']} (base model {base})",
                                                  soft_wrap=True)


def model_card(a: ArtifactRow, base: Path) -> str:
    """The export's README.md (a Hugging Face model card): what the adapter is and how to serve it safely."""
    return f"""---
library_name: peft
base_model: {base}
tags: [unlearnd, unlearning, o3, lora]
---

# unlearnd adapter {a.id} for {a.model}

A LoRA adapter made by unlearnd for deletion request `{a.request_id}` with O3 ("Practical
Unlearning for Large Language Models"): it was trained so that the model no longer answers from the data that
request named. The request's data itself is not in here.

## Route it: never apply it to every input

The adapter is meant for the inputs that touch the forgotten data, and only those. Applied to every input it
damages unrelated answers too: an adapter like this one, always on in plain peft, answered "What is the capital
of France?" with "bonjour". `gate/` holds the request's out-of-distribution detector (encoder features, no text),
which decides per input whether the adapter applies and with what weight:

- `unlearnd serve` and `unlearnd route` apply it that way (per input, mixed routes in one batch);
- other servers (vLLM, LoRAX, peft) must do the same: select the adapter per request only when the gate says so.

## Load (for inspection or a routed server)

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")   # base: {base}
```

sha256 of the adapter files (as recorded in the unlearnd ledger): `{a.sha256}`
"""
