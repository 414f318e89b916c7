"""Pruning methods: each one only computes a candidate mask per layer (methods.md §1.2b).

The trainer owns everything else: the evidence pass, the gate (`gate_open`), applying and
persisting masks (`masks.py`). A new method is a `Pruner` subclass registered in `PRUNERS`, plus
a YAML file in `conf/pruner/`. The hooks with default bodies are where methods that need more
than a mask plug in: noise layers or a moment-propagating model (`prepare_model`), an extra loss
term such as a KL (`penalty`), and post-training weight rewrites with calibration data
(`after_training`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Gate, Method, PrunerConfig, Schedule
from .masks import Masks


def layer_target(numel: int, rate: float) -> int:
    """Number of weights a layer of `numel` weights must have pruned at sparsity `rate` (A19)."""
    return math.floor(rate * numel + 1e-9)


def random_mask(weight: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Alg. 2: zero just enough surviving weights, drawn uniformly, to reach floor(rate*n)."""
    flat = weight.detach().flatten()
    survivors = (flat != 0).nonzero().flatten().cpu()
    k = max(0, layer_target(flat.numel(), rate) - (flat.numel() - survivors.numel()))
    mask = flat != 0
    if k > 0:
        chosen = survivors[torch.randperm(survivors.numel(), generator=generator)[:k]]
        mask[chosen.to(mask.device)] = False
    return mask.view_as(weight)


def magnitude_mask(weight: torch.Tensor, rate: float) -> torch.Tensor:
    """Alg. 3: zero the floor(rate*n) smallest |w|, ties broken by flat index (A12, A19)."""
    flat = weight.detach().abs().flatten()
    k = layer_target(flat.numel(), rate)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(flat, stable=True)[:k]] = False
    return mask.view_as(weight)


class Pruner:
    """Base class: the unpruned baseline. Its candidate is always the current mask."""

    def __init__(self, cfg: PrunerConfig) -> None:
        self.cfg = cfg

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def propose(self, layers: dict[str, nn.Module], masks: Masks, rate: float,
                generator: torch.Generator) -> Masks:
        return {n: m.clone() for n, m in masks.items()}

    def after_training(self, model: nn.Module, x_calib: torch.Tensor) -> None:
        return None


class RandomPruner(Pruner):
    def propose(self, layers, masks, rate, generator):
        return {n: random_mask(m.weight, rate, generator) for n, m in layers.items()}


class MagnitudePruner(Pruner):
    def propose(self, layers, masks, rate, generator):
        return {n: magnitude_mask(m.weight, rate) for n, m in layers.items()}


PRUNERS: dict[Method, type[Pruner]] = {
    Method.none: Pruner,
    Method.random: RandomPruner,
    Method.magnitude: MagnitudePruner,
}


def build_pruner(cfg: PrunerConfig) -> Pruner:
    return PRUNERS[cfg.method](cfg)


def scheduled_rate(cfg: PrunerConfig, target: float, epoch: int) -> float:
    """Sparsity to prune to at the end of `epoch` (1-based).

    oneshot: the full target from the first epoch on (A11). gradual: the cubic ramp of Zhu & Gupta,
    r_t = r (1 - (1 - f)^3) with f = (epoch - ramp_start + 1) / ramp_epochs clipped to [0, 1].
    """
    if cfg.schedule is Schedule.oneshot:
        return target
    frac = min(1.0, max(0.0, (epoch - cfg.ramp_start + 1) / cfg.ramp_epochs))
    return target * (1.0 - (1.0 - frac) ** 3)


def gate_open(gate: Gate, log_bf: float, prev_log_bf: float, beta: float) -> bool:
    """Whether this epoch's candidate is applied (methods.md §1.2d).

    `prev_log_bf` is the previous epoch's log BF, +inf before the first epoch, so the lagged
    gate's first prune is unconditional.
    """
    if gate is Gate.none:
        return True
    threshold = math.log(beta)
    if gate is Gate.lagged:
        return prev_log_bf > threshold
    return log_bf > threshold
