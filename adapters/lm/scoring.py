"""How likely a causal LM finds given answers: mean log-prob per answer token of each candidate after its prompt
(`candidate_scores`, `answer_scores`) and the answer loss. The O3 result measures score through it, as serving routes.

Cost matters on 2 CPU cores: the prompt is run once per question and its KV cache is shared by all candidates
(about 3x fewer tokens than scoring each prompt+candidate row on its own).
"""

from __future__ import annotations

import torch

from adapters.devices import device_of
from adapters.lm.loading import encode_pairs, token_logprobs


@torch.no_grad()
def answer_scores(model, tokenizer, prompts: list[str], answers: list[str], *, batch_size: int = 32,
                  sep: str = " ") -> list[float]:
    """Mean log-prob per token of each answer after its prompt (one row per pair, no cache sharing). `sep` goes
    between prompt and answer: a space after `Question: ...\nAnswer:`, nothing after a chat template's
    assistant header."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, labels = encode_pairs(
            tokenizer, prompts[i : i + batch_size], [sep + a for a in answers[i : i + batch_size]]
        )
        total, count = token_logprobs(model, ids, mask, labels)
        out += (total / count.clamp(min=1)).tolist()
    return out


@torch.no_grad()
def candidate_scores(model, tokenizer, prompts: list[str], candidates: list[tuple[str, ...]], *,
                     batch_size: int = 16, sep: str = " ") -> list[list[float]]:
    """Per question, the mean log-prob per token of each candidate; the prompt's KV cache is shared."""
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(prompts), batch_size):
        chunk_p, chunk_c = prompts[i:i + batch_size], candidates[i:i + batch_size]
        n = len(chunk_c[0])
        if any(len(c) != n for c in chunk_c):  # unequal candidate counts: score row by row
            for p, c in zip(chunk_p, chunk_c, strict=True):
                out.append(answer_scores(model, tokenizer, [p] * len(c), list(c), sep=sep))
            continue
        out += _shared_prompt_scores(model, tokenizer, chunk_p, chunk_c, n, sep)
    return out


def _shared_prompt_scores(model, tokenizer, prompts, candidates, n, sep):
    pad = tokenizer.pad_token_id
    p_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(map(len, p_ids))
    P = torch.full((len(p_ids), width), pad, dtype=torch.long)  # left-padded so every prompt ends together
    Mp = torch.zeros_like(P)
    for r, ids in enumerate(p_ids):
        P[r, width - len(ids):] = torch.tensor(ids)
        Mp[r, width - len(ids):] = 1
    device = device_of(model)
    P, Mp = P.to(device), Mp.to(device)
    pos = (Mp.cumsum(-1) - 1).clamp(min=0)
    first = model(input_ids=P, attention_mask=Mp, position_ids=pos, use_cache=True)
    cache = first.past_key_values
    cache.batch_repeat_interleave(n)
    a_ids = [tokenizer(sep + a, add_special_tokens=False)["input_ids"] for c in candidates for a in c]
    la = max(map(len, a_ids))
    A = torch.full((len(a_ids), la), pad, dtype=torch.long)
    Ma = torch.zeros_like(A)
    for r, ids in enumerate(a_ids):
        A[r, : len(ids)] = torch.tensor(ids)
        Ma[r, : len(ids)] = 1
    A, Ma = A.to(device), Ma.to(device)
    mask = torch.cat([Mp.repeat_interleave(n, 0), Ma], dim=-1)
    pos_a = pos[:, -1:].repeat_interleave(n, 0) + 1 + torch.arange(la, device=device)
    rest = model(input_ids=A, attention_mask=mask, position_ids=pos_a, past_key_values=cache, use_cache=False)
    # token j of a candidate is predicted by the prompt's last position (j = 0) or by candidate token j - 1
    logits = torch.cat([first.logits[:, -1:].repeat_interleave(n, 0), rest.logits[:, :-1]], dim=1).float()
    lp = torch.log_softmax(logits, -1).gather(-1, A.unsqueeze(-1)).squeeze(-1) * Ma
    mean = (lp.sum(-1) / Ma.sum(-1).clamp(min=1)).view(len(prompts), n)
    return mean.tolist()


def answer_loss(model, tokenizer, prompts: list[str], answers: list[str], **kw) -> float:
    """Mean negative log-likelihood per answer token (the "forget loss"; rises as a model forgets)."""
    scores = answer_scores(model, tokenizer, prompts, answers, **kw)
    return -sum(scores) / len(scores) if scores else float("nan")
