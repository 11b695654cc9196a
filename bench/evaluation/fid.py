"""Fréchet distance between two sets of feature vectors (FID when the features come from a classifier).

``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. The benchmark takes the features from its own MNIST
classifier's penultimate layer (bench/evaluation/mnist_cnn.py) rather than Inception: digits at 16x16 are far
from ImageNet. Values are comparable only between sets of the same sizes and the same feature extractor.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets a (N, D) and b (M, D)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise, as the reference implementations do
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))
