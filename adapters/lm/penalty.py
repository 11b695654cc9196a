"""O3's orthogonality penalty: sum over modules and earlier adapters of ||A_i A_new^T||_F^2, averaged over layers.

`batched_penalty` is what training uses. For every module the earlier adapters' `lora_A` (frozen) are
concatenated once into C_k (sum of r_i rows, in_features), since sum_i ||A_i A^T||_F^2 = ||C_k A^T||_F^2.
Modules whose (C_k, A_k) shapes agree are stacked, so a step costs one batched matmul per shape (a Llama has
about three: attention in, attention out, MLP down) instead of one small product per module and earlier
adapter, whose launch and autograd bookkeeping dominated training on a GPU. `looped_penalty` is the plain
form, kept as the reference the batched one is tested and benchmarked against.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from adapters.lm import lora_set


def _pairs(
    peft_model, earlier: list[dict[str, torch.Tensor]]
) -> list[tuple[str, torch.nn.Parameter, list[torch.Tensor]]]:
    """(module key, the new adapter's live lora_A, the earlier adapters' lora_A of that module), in a fixed order."""
    live = {k: p for name, p in peft_model.named_parameters() if p.requires_grad and (k := lora_set.module_key(name))}
    out = []
    for key in sorted(live):
        olds = [a[key] for a in earlier if key in a]
        if olds:
            out.append((key, live[key], olds))
    return out


def looped_penalty(peft_model, earlier: list[dict[str, torch.Tensor]], n_layers: int):
    """The penalty as one product per (module, earlier adapter): the reference form."""
    pairs = [(new, old.to(new.device, new.dtype)) for _, new, olds in _pairs(peft_model, earlier) for old in olds]

    def penalty() -> torch.Tensor:
        total = torch.zeros((), device=pairs[0][0].device if pairs else None)
        for new, old in pairs:
            total = total + ((old @ new.T) ** 2).sum()
        return total / max(n_layers, 1)

    return penalty


def batched_penalty(peft_model, earlier: list[dict[str, torch.Tensor]], n_layers: int):
    """The same value as `looped_penalty`, one batched product per group of equally shaped modules.

    Returns a zero-argument callable (evaluated every training step; gradients flow into the live lora_A)."""
    groups: dict[tuple, tuple[list[torch.nn.Parameter], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for _, new, olds in _pairs(peft_model, earlier):
        stacked = torch.cat([o.to(new.device, new.dtype) for o in olds])  # (sum r_i, in_features), frozen
        news, frozen = groups[(tuple(stacked.shape), tuple(new.shape))]
        news.append(new)
        frozen.append(stacked)
    plan = [(news, torch.stack(frozen)) for news, frozen in groups.values()]  # C: (modules, sum r_i, in)
    scale = 1.0 / max(n_layers, 1)

    def penalty() -> torch.Tensor:
        if not plan:
            return torch.zeros(())
        terms = []
        for news, frozen in plan:
            a = torch.stack(list(news))  # (modules, r, in): differentiable view of the live parameters
            terms.append(torch.bmm(frozen, a.transpose(1, 2)).square().sum())
        total = terms[0]
        for term in terms[1:]:
            total = total + term.to(total.device)
        return total * scale

    return penalty
