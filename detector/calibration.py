"""Two-Gaussian calibration of a gate's score z into O3's soft weight.

Fit N(mu_used, sd_used) to z over D_used and N(mu_rest, sd_rest) to z of held-out forget samples (both are
forget data: the mixture describes what in-distribution scores look like). O3 takes D_rest alone for the second;
gate.py adds leave-one-out scores of D_used, because D_rest is 2-4 samples for a typical request.
x0 = midpoint of the means, F = CDF of the mixture: `c(z) = 1 - |F(z) - F(2 x0 - z)|`, `w = sigmoid(10 c - 2)`.

One deviation from the formula as written: c is symmetric around x0, so an input scoring *above* the
in-distribution centre (e.g. a verbatim forget sample, more typical than any held-out one) would get a low c.
We take c = 1 for z >= x0: a score on the in-distribution side is at least as forget-like as the centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@dataclass
class TwoGaussianCalibration:
    mu_used: float
    sd_used: float
    mu_rest: float
    sd_rest: float

    @classmethod
    def fit(cls, z_used: np.ndarray, z_rest: np.ndarray) -> TwoGaussianCalibration:
        # A few samples per request (D_rest is ~4): floor the spreads at a quarter of the gap between the two
        # means, so one tight cluster cannot turn c into a step that cuts off held-out paraphrases.
        scale = max(abs(float(np.mean(z_used)) - float(np.mean(z_rest))), 1e-3) * 2.5
        return cls(float(np.mean(z_used)), max(float(np.std(z_used)), 0.1 * scale),
                   float(np.mean(z_rest)), max(float(np.std(z_rest)), 0.1 * scale))

    @property
    def x0(self) -> float:
        return 0.5 * (self.mu_used + self.mu_rest)

    def cdf(self, z: np.ndarray) -> np.ndarray:
        return 0.5 * norm.cdf(z, self.mu_used, self.sd_used) + 0.5 * norm.cdf(z, self.mu_rest, self.sd_rest)

    def confidence(self, z) -> np.ndarray:
        z = np.asarray(z, np.float64)
        c = 1.0 - np.abs(self.cdf(z) - self.cdf(2 * self.x0 - z))
        return np.where(z >= self.x0, 1.0, c)

    def weight(self, z) -> np.ndarray:
        return sigmoid(10.0 * self.confidence(z) - 2.0)

    def to_json(self) -> dict:
        return asdict(self)

