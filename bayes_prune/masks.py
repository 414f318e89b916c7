"""The one mechanism that applies, persists and measures masks; methods only compute them.

A mask is a bool tensor shaped like one parameter (True = kept), keyed by the parameter's name
(`"1.weight"`, `"3.bias"`). Weight masks come from weight-level methods; unit masks (whole neurons
or channels) are expanded into parameter masks by `structure.unit_masks`. Under persistent masks
the trainer multiplies the gradients by the mask before every optimizer step and zeroes Adam's
moments of newly pruned entries, so a pruned entry's update is exactly 0 and it stays exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def weight_masks(layers: dict[str, nn.Module]) -> Masks:
    """All-True masks over the weights of `layers` (layer name -> module)."""
    return {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}


def changes_weights(model: nn.Module, masks: Masks) -> bool:
    """True when applying `masks` would zero at least one entry that is not zero now."""
    params = dict(model.named_parameters())
    return any(bool((params[n].detach()[~m] != 0).any()) for n, m in masks.items())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """Zero the masked entries in place; returns copies of the overwritten tensors (for undo)."""
    params = dict(model.named_parameters())
    saved = {}
    for n, m in masks.items():
        if not bool(m.all()):
            saved[n] = params[n].detach().clone()
            params[n].mul_(m)
    return saved


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, w in saved.items():
        params[n].copy_(w)


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Masks) -> None:
    """Clear the moment estimates of pruned entries so Adam's update for them is exactly 0."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        state = optimizer.state.get(params[n], {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in state:
                state[key].mul_(m)


class GradMasker:
    """Multiplies the gradients of the masked parameters by their masks in one fused call."""

    def __init__(self, model: nn.Module, masks: Masks) -> None:
        params = dict(model.named_parameters())
        kept = [n for n, m in masks.items() if not bool(m.all())]
        self.params = [params[n] for n in kept]
        self.factors = [masks[n].to(params[n].dtype) for n in kept]

    def __call__(self) -> None:
        if self.params:
            torch._foreach_mul_([p.grad for p in self.params], self.factors)


def layer_sparsity(layers: dict[str, nn.Module], dense_numel: dict[str, int] | None = None
                   ) -> dict[str, float]:
    """Fraction of zero weights per layer, measured from the weights. Against `dense_numel` (the
    dense reference's weight counts) when given, so entries cut out of a layer count as pruned."""
    out = {}
    for n, m in layers.items():
        total = dense_numel[n] if dense_numel else m.weight.numel()
        out[n] = (total - int(m.weight.count_nonzero())) / total
    return out


def global_sparsity(layers: dict[str, nn.Module], dense_numel: dict[str, int] | None = None) -> float:
    nonzero = sum(int(m.weight.count_nonzero()) for m in layers.values())
    total = sum(dense_numel[n] for n in layers) if dense_numel else sum(
        m.weight.numel() for m in layers.values())
    return (total - nonzero) / max(1, total)
