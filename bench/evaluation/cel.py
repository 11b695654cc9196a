"""O3's contrastive entropy loss (CEL): fine-tune the detector's encoder on one request's D_used.

    z1_i = mean-pooled layer-l features of the trainable encoder on the MLM-masked input i
    z2_j = the same from the frozen encoder on the unmasked input j
    P    = softmax_rows(z1 z2^T / tau)             (features L2-normalised; tau = 0.1)
    L    = sum_l mean_i H(P_i)                     (+ MLM loss in the paper)

The paper trains LoRA (r=8, alpha=32 on query/key/value) on RoBERTa with MLM + CEL. all-MiniLM-L6-v2 ships
without an MLM head (it is a sentence-embedding checkpoint), and a head trained from scratch on ~17 texts would
be noise, so we train CEL alone; the LoRA's low rank and a few steps are what keep the encoder close to the
frozen one (the MLM term's job). We normalise before the dot product: raw 384-d MiniLM features have norms of
~5-10 and their dot products would saturate the softmax at the first step.

The result is a *per-request* encoder: routing then needs one encoder pass per request instead of one shared
pass. bench/router.py measures what it buys (AUROC, held-out weights) against that cost.
"""

from __future__ import annotations

import copy
import time

import torch
from peft import LoraConfig, get_peft_model

from detector.features import Encoder, mean_pool_layers


def _mask_tokens(input_ids: torch.Tensor, attention: torch.Tensor, tokenizer, rate: float, gen: torch.Generator):
    candidates = attention.bool().clone()
    for row in range(len(input_ids)):
        special = torch.tensor(tokenizer.get_special_tokens_mask(input_ids[row].tolist(),
                                                                 already_has_special_tokens=True), dtype=torch.bool)
        candidates[row] &= ~special
    chosen = (torch.rand(input_ids.shape, generator=gen) < rate) & candidates
    return torch.where(chosen, torch.full_like(input_ids, tokenizer.mask_token_id), input_ids)


def cel_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Sum over layers of the mean row entropy of softmax(z1 z2^T / tau); z1, z2: [batch, layers, dim]."""
    z1 = torch.nn.functional.normalize(z1, dim=-1).transpose(0, 1)  # [layers, batch, dim]
    z2 = torch.nn.functional.normalize(z2, dim=-1).transpose(0, 1)
    logp = torch.log_softmax(z1 @ z2.transpose(1, 2) / tau, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1).sum()


def train_cel_encoder(texts: list[str], base: Encoder, *, steps: int = 20, lr: float = 5e-4, mask_rate: float = 0.15,
                      rank: int = 8, alpha: int = 32, seed: int = 0) -> tuple[Encoder, dict]:
    """A copy of `base` fine-tuned with CEL on `texts`, LoRA merged; returns it and the training record."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    frozen = base.model
    trainable = get_peft_model(copy.deepcopy(frozen),
                               LoraConfig(r=rank, lora_alpha=alpha, target_modules=["query", "key", "value"]))
    trainable.train()
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=lr)
    batch = base.tokenizer(list(texts), padding=True, truncation=True, max_length=base.max_length, return_tensors="pt")
    with torch.no_grad():
        z2 = mean_pool_layers(frozen(**batch, output_hidden_states=True).hidden_states, batch["attention_mask"])
    losses = []
    for _ in range(steps):
        masked = _mask_tokens(batch["input_ids"], batch["attention_mask"], base.tokenizer, mask_rate, gen)
        out = trainable(input_ids=masked, attention_mask=batch["attention_mask"], output_hidden_states=True)
        loss = cel_loss(mean_pool_layers(out.hidden_states, batch["attention_mask"]), z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    merged = trainable.merge_and_unload().eval()
    enc = Encoder(model=merged, tokenizer=base.tokenizer, max_length=base.max_length, batch_size=base.batch_size,
                  path="cel")
    enc.name = f"{base.name}+cel"
    return enc, {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
                 "train_seconds": round(time.perf_counter() - t0, 3)}
