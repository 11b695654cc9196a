"""Causal language models: loading, the O3 engine (orthogonal LoRA per request), its training loop and measures."""
