"""`unlearnd sample`: a PNG grid of what a diffusion model generates, one row per class, so an operator can see
what a request changed (same version, classes and seed = the same picture; compare before and after)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from daemon.cli_common import ConfigOpt, JsonOpt, console, dumps, fail, load_config, open_ledger, registered_model


def sample(
    model: Annotated[str, typer.Argument(help="A registered diffusion model, e.g. mnist-ddpm.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    version: Annotated[str | None, typer.Option(help="Version id (default: the active version).")] = None,
    classes: Annotated[list[int] | None, typer.Option("--class", help="A class to draw (repeatable; default: "
                                                         "every class).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=256, help="Samples per class.")] = 8,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="DDIM steps.")] = 25,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Write a grid of samples of a diffusion model's active version (or --version): one row per class."""
    import torch

    from adapters.store import ArtifactStore
    from daemon.bootstrapping import ModelNotReady
    from daemon.models import ModelRegistry

    cfg = load_config(config)
    registered_model(cfg, model)
    ledger = open_ledger(cfg)
    strategy = ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).kind_strategy(model)
    if not hasattr(strategy, "sample_grid"):
        fail(f"{model} is a {cfg.models[model].kind} model; `sample` draws diffusion models", 2)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    try:
        png, drawn = strategy.sample_grid(model, version, classes, n, seed, steps)
    except ModelNotReady:
        fail(f"{model} has no version yet: the daemon builds it in the background after it starts "
             "(`unlearnd models list` shows its head once ready)")
    except KeyError as exc:  # no such version: nothing found
        fail(exc.args[0])
    except ValueError as exc:  # classes the model does not have: bad usage
        fail(exc.args[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    info = {"model": model, "version": drawn, "out": str(out), "classes": classes or "all", "per_class": n,
            "seed": seed}
    print(dumps(info)) if as_json else console.print(f"{model} {drawn}: wrote {out}")
