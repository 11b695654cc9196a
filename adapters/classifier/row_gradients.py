"""Per-row loss gradients of a classifier, kept so that the mean gradient over any subset of the rows is a sum,
not a forward and backward pass.

IAU needs, per request, the mean cross-entropy gradient over the rows to forget. Its engine computes these
per-row gradients for every remaining row of a version in the background (with the remaining-set sum it
already keeps there), so a request on that version reads its forget rows' gradient off them.

A row's gradient is kept whole for a convolution (its weight gradient is small: out x in x k x k) and in factors
for a linear layer: the weight gradient of row i is the outer product of delta_i (the loss's gradient with
respect to the layer's output) and a_i (its input), so delta and a are kept, and the sum over a subset is one
matrix product, delta_S^T a_S. The bias's gradient is delta_i itself. Both are exact, not approximations.

Only models whose every parameter belongs to an nn.Linear or an nn.Conv2d (zero padding given as numbers, one
group), each called once per forward pass, are covered (`covers`); for any other the engine computes the forget
rows' gradient on the request path as before.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters.datasets import IdIndex, LabeledSet
from adapters.devices import device_of

BATCH = 1024  # rows per forward/backward pass while the gradients are computed


def _covered_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The model's parameterised layers, if every parameter belongs to a covered one; None otherwise."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not all(_covered_layer(m) for m in layers):
        return None
    owned = [id(p) for m in layers for p in m.parameters(recurse=False)]
    return layers if owned == [id(p) for p in model.parameters()] else None  # the same order, too


def floats_per_row(model: nn.Module) -> int | None:
    """How many floats one row's gradient takes here (None: the model is not covered)."""
    layers = _layers(model)
    if layers is None:
        return None
    per_row = 0
    for layer in layers:
        if isinstance(layer, nn.Linear):
            per_row += layer.out_features + layer.in_features
        elif isinstance(layer, nn.Conv2d):
            per_row += layer.weight.numel() + (layer.out_channels if layer.bias is not None else 0)
    return per_row


def covers(model: nn.Module) -> bool:
    return floats_per_row(model) is not None


@dataclasses.dataclass
class RowGradients:
    """The per-row gradients of one version over a fixed list of rows (`ids`), with their logits."""

    index: IdIndex  # the rows' ids, in the order of every tensor below
    logits: torch.Tensor  # (rows, classes): the version's logits for each row
    parts: list[tuple[str, list[torch.Tensor]]]  # per parameter, in model.parameters() order: (kind, tensors)
    shapes: list[torch.Size]  # each parameter's shape

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The positions of `ids` (each one of this object's rows) in its tensors."""
        return self.index.positions(ids)

    def logits_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The version's logits for the rows `ids` (each one of this object's rows)."""
        return self.logits.index_select(0, self.positions(ids).to(self.logits.device))

    def mean_grad(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of the mean cross-entropy over the rows `ids`, one tensor per parameter."""
        return self._mean_grad_at(self.positions(ids).to(self.logits.device))

    def _mean_grad_at(self, positions: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for (kind, tensors), shape in zip(self.parts, self.shapes, strict=True):
            if kind == "outer":  # a linear weight: delta_S^T a_S
                delta, inputs = (t.index_select(0, positions) for t in tensors)
                out.append(delta.T @ inputs)
            else:  # "rows": the rows' gradients themselves, summed
                out.append(tensors[0].index_select(0, positions).sum(0).view(shape))
        torch._foreach_div_(out, len(positions))
        return out

    def total(self) -> list[torch.Tensor]:
        """The sum of every row's gradient (the gradient of the summed loss over all of them)."""
        every_row = torch.arange(len(self.index), device=self.logits.device)
        return [t * len(self.index) for t in self._mean_grad_at(every_row)]

    @property
    def nbytes(self) -> int:
        """The memory these hold (a linear layer's bias shares its weight's delta)."""
        tensors = {id(t): t for _, ts in self.parts for t in ts} | {id(self.logits): self.logits}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _one_call_per_row(layer: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the layer ran once, on one input per row (not twice, not at all, not a linear layer on sequences):
    then each row's gradient is one (delta, input) pair."""
    return len(calls) == 1 and calls[0][0].dim() == (2 if isinstance(layer, nn.Linear) else 4)


@torch.no_grad()
def _conv_row_grads(layer: nn.Conv2d, inputs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each row's weight gradient of a convolution, (rows, out, in * kh * kw): the output gradient times the
    unfolded input, per row."""
    cols = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                    stride=layer.stride)
    return torch.bmm(delta.flatten(2), cols.transpose(1, 2)).flatten(1)


def compute(model: nn.Module, rows: LabeledSet, batch_size: int = BATCH) -> RowGradients | None:
    """Every row's gradient of its cross-entropy at the model's weights (None if the model is not covered)."""
    layers = _layers(model)
    if layers is None:
        return None
    device = device_of(model)
    seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(module, args, output):
        seen.setdefault(module, []).append((args[0].detach(), output))

    hooks = [layer.register_forward_hook(record) for layer in layers]
    per_layer: dict[nn.Module, list[list[torch.Tensor]]] = {layer: [] for layer in layers}
    logits = []
    try:
        for start in range(0, len(rows), batch_size):
            seen.clear()
            x = rows.x[start:start + batch_size].to(device)
            with torch.enable_grad():
                out = model(x)
                if not all(_one_call_per_row(layer, seen.get(layer, [])) for layer in layers):
                    return None
                outputs = [seen[layer][0][1] for layer in layers]
                loss = F.cross_entropy(out, rows.y[start:start + batch_size].to(device), reduction="sum")
                deltas = torch.autograd.grad(loss, outputs)
            logits.append(out.detach())
            for layer, delta in zip(layers, deltas, strict=True):
                inputs = seen[layer][0][0]
                if isinstance(layer, nn.Linear):
                    per_layer[layer].append([delta.reshape(-1, layer.out_features),
                                             inputs.reshape(-1, layer.in_features)])
                elif isinstance(layer, nn.Conv2d):
                    per_layer[layer].append([_conv_row_grads(layer, inputs, delta), delta.sum((2, 3))])
    finally:
        for hook in hooks:
            hook.remove()
    parts: list[tuple[str, list[torch.Tensor]]] = []
    shapes: list[torch.Size] = []
    for layer in layers:
        joined = [torch.cat(pieces) for pieces in zip(*per_layer[layer], strict=True)]
        for name, param in layer.named_parameters(recurse=False):
            shapes.append(param.shape)
            if isinstance(layer, nn.Linear):
                parts.append(("outer", joined) if name == "weight" else ("rows", joined[:1]))
            else:
                parts.append(("rows", joined[:1]) if name == "weight" else ("rows", joined[1:]))
    return RowGradients(IdIndex(rows.ids), torch.cat(logits), parts, shapes)


def size_mb(model: nn.Module, rows: int) -> float:
    """What compute() would keep for `rows` rows, in MiB (inf for a model it does not cover)."""
    per_row = floats_per_row(model)
    return math.inf if per_row is None else per_row * rows * 4 / 2**20
