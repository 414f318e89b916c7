"""Paper 002, BMRS: structured pruning of multiplicative-noise networks by Bayesian model reduction.

Every hidden unit carries a noise variable theta with a truncated log-normal posterior under a
log-uniform prior (`bmrs_layers.LogUniformNoise`, maths in `truncnorm.py`). The training loss is the
authors' (methods.md §3.2): mean cross-entropy + KL term, the mean over layers of each layer's mean
KL, without 1/N. A criterion scores every unit from its posterior (or weights) and decides which
units go:

    bmrs_n   ΔF >= 0 under the reduced prior N(a, 1e-12) (an approximate spike at theta = e^-20);
             `exact=false` is the authors' coded ΔF, `exact=true` exact BMR (methods.md §3.3)
    bmrs_u   ΔF >= 0 under the reduced prior Uniform[ln 2^-p2, ln 2^-p1] (BMRS_U-8, BMRS_U-4)
    snr      SNR(theta) <= threshold (1, as in SBP)
    e_theta  E[theta] < threshold (0.1)
    l2       post-training: the units with the smallest incoming-weight L2 norm, as many as a given
             percentage (or as the matching bmrs_n run removed: `match_dir`)

Continuous pruning (bmrs_n, bmrs_u, snr, e_theta; phases train, finetune, compress): after every
training epoch the unit masks are recomputed from the criterion and overwrite the previous ones,
so a unit can come back (its weights regrow from zero); the fine-tuning epochs keep the masks; the
compress phase cuts the pruned units out. `bmrs_post` is the post-training mode (Fig. 2): train
without pruning, then for each criterion the accuracy-compression curve over pruning percentiles,
each point one fine-tuning epoch from the trained network, BMRS criteria stopping where ΔF >= 0
runs out. `bmrs_none` is the table's None row: the same network without noise layers.

Masks are the framework's: a pruned unit's incoming weights, bias and outgoing weights are masked
(`structure.unit_masks`), which zeroes its output after a tanh or ReLU; its noise parameters are
left out of the masks and keep following the KL, as in the authors' code, where only theta is
masked and the ΔF of a pruned unit keeps moving.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import bmrs_kernel, truncnorm
from ..bmrs_layers import LogUniformNoise, kl_terms, noise_layers, with_noise
from ..config import MethodConfig, Objective, Phase, check, is_finite
from ..models import build_model
from ..structure import cut, unit_masks, widths
from .base import Method, register_method

log = logging.getLogger("bayes_prune")


class KLAveraging(str, Enum):
    mean = "mean"  # mean over layers of each layer's mean KL (the authors' train.py default)
    sum = "sum"


class Kernel(str, Enum):
    auto = "auto"  # the fused C kernel on the CPU where it builds (bmrs_kernel.py), else PyTorch ops
    torch = "torch"


class Criterion(str, Enum):
    snr = "snr"
    e_theta = "e_theta"
    l2 = "l2"
    bmrs_n = "bmrs_n"
    bmrs_n_exact = "bmrs_n_exact"
    bmrs_u8 = "bmrs_u8"
    bmrs_u4 = "bmrs_u4"


CONTINUOUS = [Phase.train, Phase.finetune, Phase.compress]


@dataclass
class NoiseConfig(MethodConfig):
    """Settings every noise-layer method shares."""

    phases: list[Phase] = field(default_factory=lambda: list(CONTINUOUS))
    finetune_epochs: int = 10
    kl_averaging: KLAveraging = KLAveraging.mean
    kernel: Kernel = Kernel.auto
    init_logsigma: float = -5.0  # the authors' initial log sigma (mu starts at 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.init_logsigma) and truncnorm.LOGSIGMA_MIN <= self.init_logsigma
              <= truncnorm.LOGSIGMA_MAX, "pruner.init_logsigma", self.init_logsigma,
              f"a number in [{truncnorm.LOGSIGMA_MIN:g}, {truncnorm.LOGSIGMA_MAX:g}]")


@dataclass
class BMRSNConfig(NoiseConfig):
    name: str = "bmrs_n"
    method: str = "bmrs_n"
    exact: bool = False  # false: the authors' coded ΔF (+ln(2 pi)/2 over exact BMR)
    prior_std: float = 1e-6  # s~, the reduced prior's std in log theta (the authors' sqrt(1e-12))
    prior_mean: float | None = None  # m~; null = the truncation bound a = -20

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.prior_std) and self.prior_std > 0, "pruner.prior_std", self.prior_std,
              "a finite number > 0")
        check(self.prior_mean is None or (is_finite(self.prior_mean)
                                          and truncnorm.A <= self.prior_mean <= truncnorm.B),
              "pruner.prior_mean", self.prior_mean, f"null or a number in [{truncnorm.A:g}, {truncnorm.B:g}]")


@dataclass
class BMRSUConfig(NoiseConfig):
    name: str = "bmrs_u8"
    method: str = "bmrs_u"
    p1: float = 8.0  # b' = ln 2^-p1
    p2: float = 23.0  # a' = ln 2^-p2 (the float32 mantissa)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.p2) and 0 < self.p2 < -truncnorm.A / math.log(2.0), "pruner.p2", self.p2,
              f"a number in (0, {-truncnorm.A / math.log(2.0):.2f}) (a' inside [a, b])")
        check(is_finite(self.p1) and 0 <= self.p1 < self.p2, "pruner.p1", self.p1,
              "a number in [0, pruner.p2)")


@dataclass
class SNRConfig(NoiseConfig):
    name: str = "snr"
    method: str = "snr"
    threshold: float = 1.0  # prune iff SNR <= threshold

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.threshold) and self.threshold >= 0, "pruner.threshold", self.threshold,
              "a finite number >= 0")


@dataclass
class EThetaConfig(SNRConfig):
    name: str = "e_theta"
    method: str = "e_theta"
    threshold: float = 0.1  # prune iff E[theta] < threshold


@dataclass
class L2Config(NoiseConfig):
    name: str = "l2"
    method: str = "l2"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.prune, Phase.finetune,
                                                         Phase.compress])
    unit_percent: float | None = None  # percent of all noise units to prune
    match_dir: str | None = None  # else: as many as the matching run there removed (same seed,
    match_pruner: str = "bmrs_n"  # dataset, model and trainer; this pruner option)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.unit_percent is None or (is_finite(self.unit_percent) and 0 <= self.unit_percent <= 100),
              "pruner.unit_percent", self.unit_percent, "null or a number in [0, 100]")
        check((self.unit_percent is None) != (self.match_dir is None), "pruner.unit_percent",
              self.unit_percent, "a number or pruner.match_dir, exactly one of them")


@dataclass
class PostConfig(NoiseConfig):
    name: str = "bmrs_post"
    method: str = "bmrs_post"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.prune, Phase.compress])
    finetune_epochs: int = 0
    criteria: list[Criterion] = field(default_factory=lambda: [
        Criterion.snr, Criterion.l2, Criterion.bmrs_n, Criterion.bmrs_u8, Criterion.bmrs_u4])
    points: int = 100  # pruning percentiles linspace(0, 100, points), as the authors
    final: Criterion = Criterion.bmrs_n  # the run ends with this BMRS criterion's stopping point

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.points >= 2, "pruner.points", self.points, "an integer >= 2")
        check(len(self.criteria) >= 1, "pruner.criteria", self.criteria, "a non-empty list")
        check(self.final in (Criterion.bmrs_n, Criterion.bmrs_n_exact, Criterion.bmrs_u8,
                             Criterion.bmrs_u4), "pruner.final", self.final,
              "a BMRS criterion (bmrs_n, bmrs_n_exact, bmrs_u8, bmrs_u4)")


@dataclass
class DenseConfig(MethodConfig):
    name: str = "bmrs_none"
    method: str = "bmrs_none"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.finetune])
    finetune_epochs: int = 10


# -- unit scores ------------------------------------------------------------------------------------


def posterior(layer: LogUniformNoise, upper_clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) in float64, sigma from the clamped log sigma (BMRS_U clamps only from below)."""
    with torch.no_grad():
        return layer.mu.double(), truncnorm.sigma_of(layer.logsigma.double(), upper_clamp)


def incoming_l2(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's incoming weights (its row, or filter), per noise-carrying layer."""
    layers = dict(model.named_modules())
    return {n: layers[n].weight.detach().flatten(1).double().norm(dim=1) for n in noise_layers(model)}


def priority(model: nn.Module, criterion: Criterion) -> dict[str, torch.Tensor]:
    """Per unit, the order in which a criterion prunes (largest first): ΔF for the BMRS criteria,
    -SNR, -E[theta] and -(incoming L2 norm) for the others."""
    if criterion is Criterion.l2:
        return {n: -v for n, v in incoming_l2(model).items()}
    out = {}
    for name, layer in noise_layers(model).items():
        if criterion in (Criterion.bmrs_u8, Criterion.bmrs_u4):
            mu, sigma = posterior(layer, upper_clamp=False)
            out[name] = truncnorm.delta_f_uniform(mu, sigma, 8.0 if criterion is Criterion.bmrs_u8 else 4.0)
            continue
        mu, sigma = posterior(layer)
        if criterion is Criterion.snr:
            out[name] = -truncnorm.snr(mu, sigma)
        elif criterion is Criterion.e_theta:
            out[name] = -truncnorm.mean_theta(mu, sigma)
        else:
            out[name] = truncnorm.delta_f_normal(mu, sigma, exact=criterion is Criterion.bmrs_n_exact)
    return out


def ranked_keep(values: dict[str, torch.Tensor], k: int, allowed: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """Keep masks that prune the k units with the largest `values` over all layers, only among
    `allowed` units; ties go to the earlier layer and unit."""
    names = list(values)
    flat = torch.cat([values[n].detach().cpu().double().flatten() for n in names])
    order = torch.from_numpy(np.argsort(-flat.numpy(), kind="stable"))
    if allowed is not None:
        ok = torch.cat([allowed[n].flatten() for n in names])
        order = order[ok[order]]
    pruned = torch.zeros(len(flat), dtype=torch.bool)
    pruned[order[:k]] = True
    keep, i = {}, 0
    for n in names:
        keep[n] = ~pruned[i:i + values[n].numel()]
        i += values[n].numel()
    return keep


def paper_compression(model: nn.Module, keep: dict[str, torch.Tensor]) -> float:
    """The authors' "true parameter compression" (`get_true_parameter_compression_percent`) of the
    masked, uncut network, as a fraction: removed / trainable parameters, removed = 2 per pruned
    unit (mu, log sigma) + zero entries of weight tensors (ndim > 1; the masks zero a pruned unit's
    incoming row and outgoing columns). As coded, outgoing columns are not counted where the next
    weight layer's input is not the unit itself (conv -> Flatten -> Linear in LeNet5): those
    entries, zero here, hold trained values there."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values() if p.requires_grad)
    removed = sum(2 * int((~k).sum()) for k in keep.values())
    producers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for i, name in enumerate(producers):
        w = params[f"{name}.weight"].detach()
        zeros = w == 0
        prev = producers[i - 1] if i else None
        if prev in keep and w.shape[1] != keep[prev].numel():  # across a Flatten: not counted
            spatial = w.shape[1] // keep[prev].numel()
            cols = (~keep[prev]).repeat_interleave(spatial).to(w.device)
            rows_pruned = ~keep[name].to(w.device) if name in keep else torch.zeros(
                w.shape[0], dtype=torch.bool, device=w.device)
            zeros = zeros & ~(cols.view(1, -1) & ~rows_pruned.view(-1, 1))
        removed += int(zeros.sum())
    return removed / total


def unit_fraction(keep: dict[str, torch.Tensor]) -> float:
    n = sum(k.numel() for k in keep.values())
    return sum(int((~k).sum()) for k in keep.values()) / max(1, n)


# -- the methods ---------------------------------------------------------------------------------


class NoiseMethod(Method):
    """Shared machinery: the noisy network, the KL penalty, unit masks and the final cut."""

    config = NoiseConfig
    objective = Objective.likelihood

    def __init__(self, cfg, run_cfg) -> None:
        super().__init__(cfg, run_cfg)
        self.keep: dict[str, torch.Tensor] = {}
        self.stats: dict = {}
        self._layers: list[LogUniformNoise] = []
        self._layers_of: nn.Module | None = None

    def build_model(self, model_cfg, input_shape, num_classes) -> nn.Module:
        return with_noise(build_model(model_cfg, input_shape, num_classes),
                          fused=self.cfg.kernel is Kernel.auto, init_logsigma=self.cfg.init_logsigma)

    def start(self, run) -> None:
        if not self.keep:
            self.keep = {n: torch.ones(layer.mu.numel(), dtype=torch.bool)
                         for n, layer in noise_layers(run.model).items()}

    def penalty(self, model, step) -> torch.Tensor:
        if self._layers_of is not model:  # first call, or the model was rebuilt (cut, resumed)
            self._layers, self._layers_of = list(noise_layers(model).values()), model
        return kl_terms(self._layers, self.cfg.kl_averaging.value)

    def apply_keep(self, run, keep: dict[str, torch.Tensor]) -> bool:
        """Make `keep` the unit masks; returns whether any weight changed."""
        masks = unit_masks(run.model, keep, run.data.input_shape)
        carried = {f"{n}.{p}" for n, m in run.model.named_modules() if isinstance(m, LogUniformNoise)
                   for p in m.unit_params}
        masks = {k: v for k, v in masks.items() if k not in carried}
        changed = any(not torch.equal(keep[n], self.keep.get(n, keep[n])) for n in keep)
        run.set_masks(masks)
        self.keep = {n: k.clone() for n, k in keep.items()}
        return changed

    def keep_fields(self, run, keep: dict[str, torch.Tensor]) -> dict:
        return {"units_kept": {n: int(k.sum()) for n, k in keep.items()},
                "unit_compression": unit_fraction(keep),
                "param_compression": paper_compression(run.model, keep)}

    def compress(self, run) -> dict | None:
        """Cut the pruned units out. A layer that lost every unit keeps one placeholder unit with
        zero weights (a conv layer cannot have 0 channels); its output stays exactly 0."""
        keep = self.keep
        self.stats = {**self.keep_fields(run, keep), "kernel": self.kernel_used()}
        if all(bool(k.all()) for k in keep.values()):
            return None
        cut_keep = {}
        for n, k in keep.items():
            k = k.clone()
            if not k.any():
                k[0] = True
            cut_keep[n] = k
        model = cut(run.model, cut_keep, run.data.input_shape)
        after = {n: keep[n][cut_keep[n]] for n in keep}
        run.set_model(model)
        masks = {k: v for k, v in unit_masks(run.model, after, run.data.input_shape).items()
                 if not any(k.endswith("." + p) for p in LogUniformNoise.unit_params)}
        run.set_masks(masks)
        self.keep = after
        return {"units_removed_by_cut": {n: int((~k).sum()) for n, k in keep.items()},
                "widths_after_cut": widths(run.model)}

    def kernel_used(self) -> str:
        return "c" if self.cfg.kernel is Kernel.auto and bmrs_kernel.available() else "torch"

    def final(self, run) -> dict:
        stats = self.stats or {**self.keep_fields(run, self.keep), "kernel": self.kernel_used()}
        dense = run.dense.params
        return {**stats, "params_removed": 1.0 - sum(p.numel() for p in run.model.parameters()) / dense}

    def state_dict(self) -> dict:
        return {"keep": self.keep, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.keep, self.stats = state["keep"], state["stats"]


class ContinuousMethod(NoiseMethod):
    """Masks recomputed from the criterion after every training epoch (methods.md §3.4)."""

    def decide(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep decisions per noise-carrying layer (True = the unit stays)."""
        raise NotImplementedError

    def epoch_end(self, run, epoch: int) -> dict:
        keep = self.decide(run.model)
        flips = sum(int((keep[n] != self.keep[n]).sum()) for n in keep)
        changed = self.apply_keep(run, keep)
        return {**self.keep_fields(run, keep), "units_flipped": flips, "pruned": changed}


@register_method("bmrs_n")
class BMRSN(ContinuousMethod):
    config = BMRSNConfig

    def decide(self, model):
        cfg = self.cfg
        out = {}
        for name, layer in noise_layers(model).items():
            mu, sigma = posterior(layer)
            m = truncnorm.A if cfg.prior_mean is None else cfg.prior_mean
            out[name] = (truncnorm.delta_f_normal(mu, sigma, m, cfg.prior_std, cfg.exact) < 0).cpu()
        return out


@register_method("bmrs_u")
class BMRSU(ContinuousMethod):
    config = BMRSUConfig

    def decide(self, model):
        out = {}
        for name, layer in noise_layers(model).items():
            mu, sigma = posterior(layer, upper_clamp=False)
            out[name] = (truncnorm.delta_f_uniform(mu, sigma, self.cfg.p1, self.cfg.p2) < 0).cpu()
        return out

    def epoch_end(self, run, epoch):
        fields = super().epoch_end(run, epoch)
        below = -self.cfg.p2 * math.log(2.0)  # the §3.3 caveat: posteriors below a' are kept
        fields["units_mu_below_window"] = sum(int((layer.mu.detach() < below).sum())
                                              for layer in noise_layers(run.model).values())
        return fields


@register_method("snr")
class SNR(ContinuousMethod):
    config = SNRConfig

    def decide(self, model):
        return {n: (truncnorm.snr(*posterior(layer)) > self.cfg.threshold).cpu()
                for n, layer in noise_layers(model).items()}


@register_method("e_theta")
class ETheta(ContinuousMethod):
    config = EThetaConfig

    def decide(self, model):
        return {n: (truncnorm.mean_theta(*posterior(layer)) >= self.cfg.threshold).cpu()
                for n, layer in noise_layers(model).items()}


@register_method("l2")
class L2(NoiseMethod):
    """Post-training unit-norm pruning: train with noise layers and no pruning, remove the units
    with the smallest incoming-weight L2 norm over the whole network, fine-tune (the paper's L2
    row, matched to BMRS_N's unit compression as the authors' `--compression_percentage_file`)."""

    config = L2Config

    def prune(self, run, calib) -> dict:
        percent = self.cfg.unit_percent
        source = None
        if percent is None:
            percent, source = matched_percent(self.run_cfg, Path(self.cfg.match_dir), self.cfg.match_pruner)
        norms = incoming_l2(run.model)
        n = sum(v.numel() for v in norms.values())
        keep = ranked_keep({k: -v for k, v in norms.items()}, round(percent / 100 * n))
        self.apply_keep(run, keep)
        return {**self.keep_fields(run, keep), "target_unit_percent": percent, "matched_run": source}


def matched_percent(run_cfg, root: Path, pruner: str) -> tuple[float, str]:
    """Percent of noise units the finished `pruner` run under `root` with this run's seed, dataset,
    model and trainer removed."""
    import json

    from ..config import to_dict
    from ..schema import find_run_dirs, flatten

    mine = flatten(to_dict(run_cfg))
    same = [k for k in mine if k.split(".")[0] in ("dataset", "model", "trainer") and k not in (
        "trainer.device", "trainer.threads", "trainer.progress", "trainer.eval_batch_size",
        "trainer.cuda_graph")] + ["seed"]
    for run_dir in find_run_dirs(root):
        try:
            record = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") != "done" or not isinstance(record.get("config"), dict):
            continue
        theirs = flatten(record["config"])
        if theirs.get("pruner.name") == pruner and all(theirs.get(k) == mine[k] for k in same):
            return 100.0 * float(record["final"]["unit_compression"]), str(run_dir)
    raise FileNotFoundError(f"no finished pruner={pruner} run with seed {run_cfg.seed} and this run's "
                            f"dataset, model and trainer settings under {root}; run it first")


@register_method("bmrs_post")
class PostTraining(NoiseMethod):
    """Post-training pruning (methods.md §3.4, the paper's Fig. 2)."""

    config = PostConfig

    def prune(self, run, calib) -> dict:
        from ..phases import finite

        cfg = self.cfg
        snapshot = _snapshot(run)
        fractions = np.linspace(0, 100, cfg.points)
        sweep, stops, final_state = [], {}, None
        for criterion in cfg.criteria:
            values = priority(run.model, criterion)
            n = sum(v.numel() for v in values.values())
            bmrs = criterion not in (Criterion.snr, Criterion.e_theta, Criterion.l2)
            allowed = {k: v >= 0 for k, v in values.items()} if bmrs else None
            limit = sum(int(a.sum()) for a in allowed.values()) if allowed else n
            last = None
            for lam in fractions:
                k = min(round(lam / 100 * n), limit)
                if last is not None and k == last["units_pruned"]:
                    sweep.append({**last, "percentile": float(lam), "repeat": True})
                    continue
                _restore(run, snapshot)
                keep = ranked_keep(values, k, allowed)
                self.apply_keep(run, keep)
                fields = self.keep_fields(run, keep)
                run.train_epoch(1, Phase.finetune)
                loss, acc = finite(run.evaluate(), f"{criterion.value} at {lam:.1f} %")
                last = {"criterion": criterion.value, "percentile": float(lam), "units_pruned": k,
                        "unit_compression": fields["unit_compression"],
                        "param_compression": fields["param_compression"], "test_loss": loss,
                        "test_acc": acc, "stop": bool(bmrs and k == limit), "repeat": False}
                sweep.append(last)
                if bmrs and k == limit and criterion is cfg.final:
                    final_state = (_snapshot(run), keep)
            if bmrs:
                stops[criterion.value] = next(p for p in sweep if p["criterion"] == criterion.value
                                              and p["stop"])
            log.info("post-training %s: %d points, %s", criterion.value,
                     sum(1 for p in sweep if p["criterion"] == criterion.value and not p["repeat"]),
                     f"stops at {stops[criterion.value]['param_compression']:.1%} parameters"
                     if bmrs else "no stopping point")
        if final_state is None:  # the final criterion was not swept: its stopping point alone
            values = priority(run.model, cfg.final)
            allowed = {k: v >= 0 for k, v in values.items()}
            _restore(run, snapshot)
            keep = ranked_keep(values, sum(int(a.sum()) for a in allowed.values()), allowed)
            self.apply_keep(run, keep)
            run.train_epoch(1, Phase.finetune)
            final_state = (_snapshot(run), keep)
        _restore(run, final_state[0])
        self.apply_keep(run, final_state[1])
        return {**self.keep_fields(run, final_state[1]), "sweep": sweep, "stops": stops}


def _snapshot(run) -> dict:
    return {"model": copy.deepcopy(run.model.state_dict()),
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "torch_rng": torch.get_rng_state(), "shuffle_gen": run.shuffle_gen.get_state()}


def _restore(run, snap: dict) -> None:
    """Weights, optimizer, noise RNG and data order as at the snapshot (every point of a sweep
    fine-tunes on the same batches and noise draws)."""
    run.set_masks({n: torch.ones_like(m) for n, m in run.masks.items()})
    run.model.load_state_dict(snap["model"])
    run.optimizer.load_state_dict(snap["optimizer"])
    torch.set_rng_state(snap["torch_rng"])
    run.shuffle_gen.set_state(snap["shuffle_gen"])


@register_method("bmrs_none")
class NoNoise(Method):
    """The BMRS table's None row: the plain network (no noise layers, no KL), trained and
    fine-tuned as long as the pruned ones."""

    config = DenseConfig
    objective = Objective.likelihood

    def final(self, run) -> dict:
        return {"unit_compression": 0.0, "param_compression": 0.0, "params_removed": 0.0}
