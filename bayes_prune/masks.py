"""The one mechanism that applies, persists and measures masks; pruners only compute them.

A mask is a bool tensor shaped like a layer's weight (True = kept). Under `mask: persistent`
the trainer multiplies the gradients by the mask before every optimizer step and zeroes Adam's
moments of newly pruned weights, so a pruned weight's update is exactly 0 and it stays exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def full_masks(layers: dict[str, nn.Module]) -> Masks:
    return {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}


def changes_weights(layers: dict[str, nn.Module], masks: Masks) -> bool:
    """True when applying `masks` would zero at least one weight that is not zero now."""
    return any(bool((m.weight.detach()[~masks[n]] != 0).any()) for n, m in layers.items())


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: Masks) -> dict[str, torch.Tensor]:
    """Zero the masked weights in place; returns copies of the overwritten tensors (for undo)."""
    saved = {}
    for n, m in layers.items():
        if not bool(masks[n].all()):
            saved[n] = m.weight.detach().clone()
            m.weight.mul_(masks[n])
    return saved


@torch.no_grad()
def restore_weights(layers: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    for n, w in saved.items():
        layers[n].weight.copy_(w)


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, layers: dict[str, nn.Module],
                         masks: Masks) -> None:
    """Clear the moment estimates of pruned weights so Adam's update for them is exactly 0."""
    for n, m in layers.items():
        state = optimizer.state.get(m.weight, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in state:
                state[key].mul_(masks[n])


class GradMasker:
    """Multiplies the gradients of the masked weights by their masks in one fused call."""

    def __init__(self, layers: dict[str, nn.Module], masks: Masks) -> None:
        self.weights = [m.weight for m in layers.values()]
        self.factors = [masks[n].to(m.weight.dtype) for n, m in layers.items()]

    def __call__(self) -> None:
        torch._foreach_mul_([w.grad for w in self.weights], self.factors)


def layer_sparsity(layers: dict[str, nn.Module]) -> dict[str, float]:
    """Fraction of exactly-zero entries per weight tensor, measured from the weights."""
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in layers.items()}


def global_sparsity(layers: dict[str, nn.Module]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / max(1, sum(m.weight.numel() for m in layers.values()))
