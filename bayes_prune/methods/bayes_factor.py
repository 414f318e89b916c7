"""Paper 000: random and magnitude pruning after every epoch, gated by a Bayes factor.

At the end of every train-phase epoch the method proposes a per-layer weight mask (Alg. 2 / 3),
computes log BF = LP(w * m) - LP(w) over the training set (methods.md §1.1-§1.2) and applies the
candidate iff the gate is open. `none` runs the same evidence pass with the current mask as its
candidate, so the Unpruned column logs its evidence too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ..config import MethodConfig, check, is_finite
from ..evidence import log_prior
from ..masks import Masks, apply_masks, changes_weights, restore
from ..models import weight_layers
from .base import Method, register_method


class Gate(str, Enum):
    none = "none"  # always apply the candidate (the non-Bayes baselines)
    lagged = "lagged"  # apply iff the previous epoch's log BF > log beta (first prune unconditional)
    tentative = "tentative"  # apply iff this candidate's log BF > log beta


class Schedule(str, Enum):
    oneshot = "oneshot"
    gradual = "gradual"


class MaskMode(str, Enum):
    persistent = "persistent"
    regrow = "regrow"


@dataclass
class UnprunedConfig(MethodConfig):
    name: str = "none"
    method: str = "none"


@dataclass
class GatedConfig(MethodConfig):
    gate: Gate = Gate.none
    beta: float = 1.0  # Bayes-factor threshold: prune iff log BF > log(beta)
    schedule: Schedule = Schedule.oneshot
    ramp_start: int = 1  # gradual: first epoch that prunes
    ramp_epochs: int = 10  # gradual: epochs over which the cubic ramp reaches the target
    mask: MaskMode = MaskMode.persistent

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.beta) and self.beta > 0, "pruner.beta", self.beta,
              "a finite number > 0")
        check(self.ramp_start >= 1, "pruner.ramp_start", self.ramp_start, "an integer >= 1")
        check(self.ramp_epochs >= 1, "pruner.ramp_epochs", self.ramp_epochs, "an integer >= 1")


@dataclass
class RandomConfig(GatedConfig):
    name: str = "random"
    method: str = "random"


@dataclass
class MagnitudeConfig(GatedConfig):
    name: str = "magnitude"
    method: str = "magnitude"


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


def scheduled_rate(cfg: GatedConfig, target: float, epoch: int) -> float:
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


def first_epoch_reaching(history: list[dict], layers: dict[str, int], target: float) -> int | None:
    """First train epoch at which every prunable layer (name -> weight count) held at least
    floor(target * n) zeros."""
    need = {n: layer_target(numel, target) / numel for n, numel in layers.items()}
    for entry in history:
        if entry.get("phase") == "train" and all(
                entry["sparsity_per_layer"][n] >= need[n] - 1e-12 for n in need):
            return entry["epoch"]
    return None


@register_method("none")
class Unpruned(Method):
    """Trains, and logs the evidence of the network as it stands every epoch (log BF = 0)."""

    config = UnprunedConfig
    stackable = True

    def __init__(self, cfg, run_cfg) -> None:
        super().__init__(cfg, run_cfg)
        self.prev_log_bf = math.inf

    def start(self, run) -> None:
        self.evidence = run.evidence(self.run_cfg.evidence.subsample, self.run_cfg.seed, self.predict)

    def propose(self, layers: dict[str, nn.Module], masks: Masks, rate: float,
                generator: torch.Generator) -> Masks:
        return {n: m.clone() for n, m in masks.items()}

    def target(self) -> float:
        return self.run_cfg.sparsity.percent / 100.0

    def epoch_end(self, run, epoch: int) -> dict:
        """The evidence pass and the gate (methods.md §1.2 a-e)."""
        t0 = time.perf_counter()
        cfg, model = self.cfg, run.model
        prior_weights = [m.weight for m in weight_layers(model).values()]
        rate = scheduled_rate(cfg, self.target(), epoch) if isinstance(cfg, GatedConfig) else 0.0
        candidate = self.propose(run.prunable, run.masks, rate, run.prune_gen)
        ll_before = self.evidence.log_likelihood(model)
        lp_before = ll_before + log_prior(prior_weights, self.run_cfg.prior)
        changes = changes_weights(model, candidate)
        saved = apply_masks(model, candidate) if changes else {}
        ll_after = self.evidence.log_likelihood(model) if changes else ll_before
        lprior_after = log_prior(prior_weights, self.run_cfg.prior)
        log_bf = (ll_after + lprior_after) - lp_before
        gate = getattr(cfg, "gate", Gate.none)
        is_open = gate_open(gate, log_bf, self.prev_log_bf, getattr(cfg, "beta", 1.0))
        if is_open:
            run.set_masks(candidate, persistent=getattr(cfg, "mask", None) is not MaskMode.regrow)
        else:
            restore(model, saved)
            ll_after, lprior_after = ll_before, lp_before - ll_before
        self.prev_log_bf = log_bf
        return {"log_prior": lprior_after, "log_likelihood": ll_after, "log_bf": log_bf,
                "gate_open": is_open, "pruned": is_open and changes, "target_sparsity": rate,
                "evidence_seconds": time.perf_counter() - t0}

    def final(self, run) -> dict:
        target = self.target()
        counts = {n: run.dense.weights[n] for n in run.prunable}
        return {"target_sparsity": target,
                "epoch_target_reached": first_epoch_reaching(run.history, counts, target)}

    def state_dict(self) -> dict:
        return {"prev_log_bf": self.prev_log_bf}

    def load_state_dict(self, state: dict) -> None:
        self.prev_log_bf = state["prev_log_bf"]


@register_method("random")
class RandomPruning(Unpruned):
    """Alg. 2 behind the gate; `pruner=random` (gate none) and `pruner=bayes_random` (lagged)."""

    config = RandomConfig
    uses_sparsity = True

    def propose(self, layers, masks, rate, generator):
        return {f"{n}.weight": random_mask(m.weight, rate, generator) for n, m in layers.items()}


@register_method("magnitude")
class MagnitudePruning(Unpruned):
    """Alg. 3 behind the gate; `pruner=magnitude` (gate none) and `pruner=bayes_magnitude` (lagged)."""

    config = MagnitudeConfig
    uses_sparsity = True

    def propose(self, layers, masks, rate, generator):
        return {f"{n}.weight": magnitude_mask(m.weight, rate) for n, m in layers.items()}
