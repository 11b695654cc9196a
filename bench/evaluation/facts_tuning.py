"""The one-off fine-tune that makes a causal LM know the fictitious facts (and the reference model without some).

Full fine-tune of every transformer block; the (tied) token embeddings stay frozen, which saves the largest
gradient and optimizer state (49k x 576 on SmolLM2) and keeps general knowledge steadier. The model learns
the three training paraphrases of each fact; the held-out paraphrase is never shown (D.U. measures whether
knowledge, not a string, was learnt). The *reference* model is the same recipe on the retained people only:
what S.U./D.U. should fall to after unlearning (the "retrain without the forget set" gold standard).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from adapters.lm import loading as lm
from adapters.lm import training as lm_train
from bench.evaluation.facts import QA


def teach_facts(model_dir: str | Path, qas: list[QA], out_dir: str | Path, *, epochs: int = 4, lr: float = 1e-4,
                batch_size: int = 8, seed: int = 0, device: str = "cpu") -> dict:
    """Fine-tune the model in `model_dir` on `qas` and save it (safetensors + tokenizer) to `out_dir`.

    Returns the training report, also written to `out_dir/teach.json`. Accuracy before/after is measured by
    the caller (the benchmark), which knows which subsets matter.
    """
    torch.manual_seed(seed)
    model, tokenizer = lm.load(model_dir, device=device)
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in embeddings)
    eos = tokenizer.eos_token or ""
    t0 = time.perf_counter()
    stats = lm_train.fit(model, tokenizer, [q.prompt for q in qas], [f" {q.answer}{eos}" for q in qas],
                         epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"qa_pairs": len(qas), "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "train_seconds": time.perf_counter() - t0, **{k: v for k, v in stats.items() if k != "seconds"}}
    (out / "teach.json").write_text(json.dumps(report, indent=2))
    return report
