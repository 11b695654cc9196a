"""Apply LoRA adapters to a peft model with a different weight for every sample of a batch.

peft scales an adapter per layer (`scaling[name]`), the same for the whole batch; the router gives a weight per
input. O3's formula is `h = W x + w(x) * B A x * scaling`, and `B A x * scaling` is linear in the output of
`lora_B`, so scaling that output per sample is exact: a forward hook on each adapter's `lora_B` multiplies
sample b's rows by w_b (0 where the adapter does not apply to b). One batched forward serves mixed routes;
no regrouping of the batch by weights, no copies of the model. Adapters that no sample uses are deactivated,
and a batch the router leaves alone runs the plain base model: every LoRA wrapper is taken out of the module
tree for the block (its base layer put back in its place), so not even peft's per-module dispatch runs.

Fast path: when every sample of the batch has the same route (one serving request, or a batch that shares its
adapters), the route's weighted deltas `sum_a w_a * scaling_a * B_a A_a` are added to the base weights of the
LoRA modules for the block, and the LoRA wrappers are taken out as above: decoding then costs what the base model costs,
where the unmerged branches (a dropout, two small matmuls and a hook per module and token) cost far more per
token at small batch. The merged weights are new tensors and the base weights themselves are put back
afterwards, bit for bit (no add-then-subtract rounding); the price is one extra copy of the adapted modules'
weights while the block runs.

Limits: plain LoRA (`lora_B` is a module per adapter); not DoRA, where the magnitude term is not linear in w.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from adapters.devices import device_of


def _lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _scale_rows(weights: torch.Tensor):
    def hook(_module, _inputs, output):
        b = output.shape[0]
        w = weights if b == len(weights) else weights.repeat_interleave(b // len(weights))  # beams / n>1
        return output * w.to(output.device, output.dtype).view(b, *([1] * (output.dim() - 1)))

    return hook


@contextmanager
def per_sample_adapters(model, routes: Sequence[dict[str, float]], *, merge: bool = True) -> Iterator[None]:
    """Within the block, sample b of a batch gets adapter a at weight routes[b].get(a, 0).

    `merge`: a batch whose samples share one route runs merged (`merged_adapters`). Worth it for a generation (one
    merge, many forward passes); a caller that runs one or two forward passes (scoring) passes False.

    `model` is a peft `PeftModel` whose adapters are loaded (`load_adapter`) under the router's adapter ids.
    The batch given to forward/generate inside the block must be in the order of `routes`.
    """
    used = sorted({name for r in routes for name, w in r.items() if w > 0})
    known = set(model.peft_config)
    missing = [n for n in used if n not in known]
    if missing:
        raise KeyError(f"adapters not loaded in the model: {missing}")
    if not used:
        with _base_layers_only(model):
            yield
        return
    if merge and all(r == routes[0] for r in routes):
        with merged_adapters(model, {name: float(routes[0][name]) for name in used}):
            yield
        return
    previous = list(model.base_model.active_adapters)
    model.base_model.set_adapter(used)
    handles = []
    try:
        for name in used:
            w = torch.tensor([float(r.get(name, 0.0)) for r in routes], device=device_of(model))
            for layer in _lora_layers(model):
                if name in layer.lora_B:
                    handles.append(layer.lora_B[name].register_forward_hook(_scale_rows(w)))
        yield
    finally:
        for h in handles:
            h.remove()
        model.base_model.set_adapter(previous if len(previous) > 1 else previous[0])


@contextmanager
def merged_adapters(model, weights: dict[str, float]) -> Iterator[None]:
    """Within the block, the whole batch runs base weights + sum_a weights[a] * (adapter a's delta), LoRA branches
    off; the original weight tensors are restored afterwards (the same tensors, untouched)."""
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the model may be trained later
            for layer in _lora_layers(model):
                names = [n for n in weights if n in layer.lora_A or n in getattr(layer, "lora_embedding_A", {})]
                if not names:
                    continue
                weight = layer.get_base_layer().weight
                delta = sum(weights[n] * layer.get_delta_weight(n) for n in names)
                saved.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
        with _base_layers_only(model):
            yield
    finally:
        for weight, original in reversed(saved):
            weight.data = original


@contextmanager
def _base_layers_only(model) -> Iterator[None]:
    """Within the block, every LoRA layer of `model` is replaced in its parent by the base layer it wraps."""
    swapped = []
    try:
        for name, layer in list(model.named_modules()):
            if isinstance(layer, LoraLayer) and name:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer.get_base_layer())
                swapped.append((parent, child, layer))
        yield
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)
