"""A set of LoRA adapters on one base model: read them, measure their overlap, serve them together.

Works on PEFT's own directory layout (adapter_config.json + adapter_model.safetensors), so it applies equally
to adapters unlearnd made and to any other peft LoRA. Keys of `lora_A` tensors are normalised to the module
path (``...layers.3.self_attn.q_proj``) so adapters saved and adapters live in a model compare alike.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA_A = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[^.]+)?\.weight$")


def module_key(param_name: str) -> str | None:
    """`base_model.model.model.layers.0.mlp.up_proj.lora_A[.name].weight` -> `model.layers.0.mlp.up_proj`."""
    m = _LORA_A.match(param_name)
    return m.group(1) if m else None


def read_lora_A(directory: str | Path) -> dict[str, torch.Tensor]:
    """The frozen `lora_A` matrices (rank x in_features) of a saved adapter, by module path."""
    return lora_A_of(load_file(str(Path(directory) / ADAPTER_WEIGHTS)))


def lora_A_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Same as `read_lora_A` for an in-memory adapter state dict."""
    return {k: v.float() for name, v in state.items() if (k := module_key(name))}


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far two adapters' input subspaces overlap, over the modules they share.

    `max_cosine`: max over modules of max |cos| between a row of A_a and a row of A_b (the "max normalised
    |A_i A_j^T|"; 0 = orthogonal, 1 = a shared direction). `mean_frobenius`: mean over modules of
    ||A_a A_b^T||_F / (||A_a||_F ||A_b||_F).
    """
    worst, fro = 0.0, []
    for key in a.keys() & b.keys():
        x = a[key]
        y = b[key].to(x.device, x.dtype)  # a saved adapter (CPU) against one just trained (the model's device)
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
        worst = max(worst, cos.abs().max().item())
        fro.append(((x @ y.T).norm() / (x.norm() * y.norm()).clamp(min=1e-12)).item())
    return {"max_cosine": worst, "mean_frobenius": sum(fro) / len(fro) if fro else 0.0}


def orthogonality_report(adapters: dict[str, str | Path | dict[str, torch.Tensor]]) -> dict:
    """Pairwise overlap of named adapters (directories or lora_A dicts); what `adapters show` prints.

    Returns {"max_cosine": worst pair's value, "pairs": [{"a", "b", "max_cosine", "mean_frobenius"}, ...]}.
    """
    mats = {n: (v if isinstance(v, dict) else read_lora_A(v)) for n, v in adapters.items()}
    overlaps = {(i, j): overlap(mats[i], mats[j]) for i, j in itertools.combinations(sorted(mats), 2)}
    return {"max_cosine": max((o["max_cosine"] for o in overlaps.values()), default=0.0),
            "pairs": [{"a": i, "b": j, **o} for (i, j), o in overlaps.items()]}


def attach(model, adapters: dict[str, str | Path]) -> PeftModel:
    """Wrap a base model with named saved adapters, all active at once ("always on"); plain peft loading.

    The base model's modules are modified in place (LoRA layers injected); base weights are not changed.
    """
    if not adapters:
        raise ValueError("attach needs at least one adapter")
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(adapters[n]), adapter_name=n)
    activate(peft_model, names)
    return peft_model.eval()


def activate(peft_model: PeftModel, names: list[str]) -> None:
    """Make exactly `names` active; their LoRA outputs add up (each at its own scaling)."""
    peft_model.base_model.set_adapter(list(names), inference_mode=True)
