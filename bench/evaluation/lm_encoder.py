"""The served LM's own hidden states as the router's features: a candidate encoder the router benchmark compares
with MiniLM (bench/router.py); not served."""

from __future__ import annotations

from pathlib import Path

import torch

from detector.features import Encoder


class CausalLMEncoder(Encoder):
    """The served LM's own hidden states as features (no second model in memory; costs a pass of the LM)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int = 128, batch_size: int = 16):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The decoder stack without the LM head: features need hidden states, not 49k-way logits per token.
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
        super().__init__(Path("served-lm"), max_length=max_length, batch_size=batch_size,
                         model=backbone, tokenizer=tokenizer)
        self.name = getattr(model.config, "_name_or_path", "served-lm") or "served-lm"
