"""Log prior, log likelihood and the no-grad evaluation pass (methods.md §1.1).

LP(w) = log p(D|w) + log p(w), with log p(D|w) = -sum_i CE_i over the training set, accumulated
in float64. log BF = LP(w * m) - LP(w), compared in the log domain. Predictions come from the
method (`Method.predict`: logits or log-probabilities), so a moment-propagating network is
evaluated the same way as a plain one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig, PriorName


def log_prior(weights: list[torch.Tensor], prior: PriorConfig) -> float:
    """Sum of the i.i.d. log densities of every entry of `weights` (float64)."""
    n = sum(w.numel() for w in weights)
    if prior.name is PriorName.gaussian:
        sq = sum(float(w.detach().double().square().sum()) for w in weights)
        return -sq / (2 * prior.sigma**2) - 0.5 * n * math.log(2 * math.pi * prior.sigma**2)
    ab = sum(float(w.detach().double().abs().sum()) for w in weights)
    return -ab / prior.scale - n * math.log(2 * prior.scale)


@torch.no_grad()
def add_prior_grad_(weights: list[torch.Tensor], prior: PriorConfig, n_train: int) -> None:
    """Add the gradient of -log p(w)/n to the weights' gradients (the posterior objective, A6)."""
    grads = [w.grad for w in weights]
    if prior.name is PriorName.gaussian:
        torch._foreach_add_(grads, weights, alpha=1.0 / (prior.sigma**2 * n_train))
    else:
        torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=1.0 / (prior.scale * n_train))


Predict = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             predict: Predict = logits_of) -> tuple[float, int]:
    """Summed cross-entropy (float64) and number of correct predictions over (x, y)."""
    was_training = model.training
    model.eval()
    ce = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        logits = predict(model, x[i : i + batch_size])
        yb = y[i : i + batch_size]
        ce += F.cross_entropy(logits.double(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return float(ce), int(correct)


class Evidence:
    """log p(D|w) over the full training set, or estimated on a fixed random subsample.

    The subsample is drawn once, so successive evaluations (before / after a prune) see the same
    examples and their difference is not inflated by sampling noise.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 subsample: int | None, seed: int, predict: Predict = logits_of) -> None:
        self.n = len(x)
        if subsample is not None and subsample < self.n:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(self.n, generator=g)[:subsample].to(x.device)
            x, y = x[idx], y[idx]
        self.x, self.y, self.batch_size, self.predict = x, y, batch_size, predict
        self.scale = self.n / len(x)

    def log_likelihood(self, model: nn.Module) -> float:
        ce, _ = evaluate(model, self.x, self.y, self.batch_size, self.predict)
        return -ce * self.scale
