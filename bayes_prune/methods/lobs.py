"""Paper 001: layer-wise Optimal Brain Surgeon against magnitude pruning, as a post-training
`prune` phase (methods.md §2), and LeNet-300-100 (784-300-100-10, ReLU).

Each prunable layer in forward order gets its Hessian H = (1/N) Σ x xᵀ from its inputs over the
calibration set (float64; by default with the upstream layers already pruned, `sequential`), is
pruned to floor(rate · n) weights by `variant`, and has its compensated weights written back
before the next layer's inputs are taken:

    exact      row-wise OBS with inverse downdates, non-uniform rows from the pooled per-step
               losses (OBC, §2.3)
    approx     paper 001's simplified L-OBS: inverse brought up to date only every `interval`
               pruned weights; with `retrain_steps` > 0, that many masked training steps follow
               every `interval` prunes (paper 001: 3 every 2,000)
    sparsegpt  SparseGPT's fixed column order and Cholesky trick (§2.4)
    magnitude  the smallest |w| zeroed, nothing compensated (the post-training control)

The maths is in `bayes_prune/obs.py`; here only the layers, the calibration data and the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .. import obs
from ..config import ConfigError, MethodConfig, Objective, Phase, check, is_finite
from ..evidence import add_prior_grad_
from ..masks import Masks
from ..models import FCNConfig, build_fcn, register_model, weight_layers
from .base import Method, register_method
from .bayes_factor import layer_target


@dataclass
class LeNet300Config(FCNConfig):
    name: str = "lenet300_100"
    hidden: list[int] = field(default_factory=lambda: [300, 100])


@register_model("lenet300_100", LeNet300Config)
def build_lenet300_100(cfg: LeNet300Config, input_shape: tuple[int, int, int], num_classes: int
                       ) -> nn.Module:
    """LeNet-300-100 (paper 001 §3): ReLU hidden layers 300 and 100, a linear output."""
    return build_fcn(cfg, input_shape, num_classes)


class Variant(str, Enum):
    exact = "exact"
    approx = "approx"
    sparsegpt = "sparsegpt"
    magnitude = "magnitude"


@dataclass
class LOBSConfig(MethodConfig):
    name: str = "lobs"
    method: str = "lobs"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.prune, Phase.finetune])
    finetune_epochs: int = 1
    calibration_size: int = 10000
    variant: Variant = Variant.exact
    damping: float = 1e-4  # H += damping · mean(diag H) · I
    fold_bias: bool = True  # the bias is a never-pruned coordinate that takes compensations
    sequential: bool = True  # each layer's inputs come from the network pruned so far
    interval: int = 2000  # approx: pruned weights between inverse updates (and retraining)
    retrain_steps: int = 0  # approx: masked training steps after every `interval` prunes
    block_size: int = 128  # sparsegpt: columns per block
    row_batch: int = 128  # exact: rows traced at once (2 · row_batch · d² float64 in memory)
    hessian_batch: int = 1024  # calibration images per forward pass

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.damping) and self.damping >= 0, "pruner.damping", self.damping,
              "a finite number >= 0")
        for key in ("interval", "block_size", "row_batch", "hessian_batch"):
            check(getattr(self, key) >= 1, f"pruner.{key}", getattr(self, key), "an integer >= 1")
        check(self.retrain_steps >= 0, "pruner.retrain_steps", self.retrain_steps,
              "an integer >= 0")


HookFactory = Callable[[str, nn.Module, Masks, bool], obs.ChunkHook]


def prune_layers(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, rate: float,
                 cfg: LOBSConfig, masks: Masks, hook: HookFactory | None = None
                 ) -> tuple[Masks, dict]:
    """Prune `layers` of `model` (in forward order) to floor(rate · n) weights each with
    `cfg.variant`, Hessians from the calibration images `x`; the compensated weights are
    written into the layers and the masks (`masks` updated) returned with the record fields:
    per layer the reconstruction error ||(Ŵ-W)X||²/||WX||², the seconds of the layer (Hessian
    included) and of its Hessian."""
    order = list(weight_layers(model))
    masks = dict(masks)
    errors: dict[str, float] = {}
    seconds: dict[str, float] = {}
    hessian_seconds: dict[str, float] = {}
    t0 = _clock(x.device)
    dense_h = {} if cfg.sequential else obs.hessians(model, layers, x, cfg.hessian_batch,
                                                     cfg.fold_bias)
    shared = (_clock(x.device) - t0) / max(1, len(layers))
    for name, layer in layers.items():
        t0 = _clock(x.device)
        h = (obs.hessians(model, {name: layer}, x, cfg.hessian_batch, cfg.fold_bias)[name]
             if cfg.sequential else dense_h.pop(name))
        hessian_seconds[name] = _clock(x.device) - t0 + shared
        key = f"{name}.weight"
        w = obs.layer_matrix(layer, cfg.fold_bias)
        d_col = layer.weight[0].numel()
        n_fixed = w.shape[1] - d_col
        k = layer_target(layer.weight.numel(), rate)
        retrain = hook(name, layer, masks, order.index(name) > 0) if hook else None
        w_hat, removed = prune_matrix(w, h, k, n_fixed, cfg, retrain)
        obs.write_layer(layer, w_hat, cfg.fold_bias)
        masks[key] = masks[key] & ~removed[:, :d_col].reshape(layer.weight.shape)
        with torch.no_grad():
            layer.weight.mul_(masks[key])
        errors[name] = obs.reconstruction_error(w, obs.layer_matrix(layer, cfg.fold_bias), h)
        seconds[name] = _clock(x.device) - t0 + shared
    return masks, {"reconstruction_error": errors, "layer_seconds": seconds,
                   "hessian_seconds": hessian_seconds, "prune_seconds": sum(seconds.values())}


def prune_matrix(w: torch.Tensor, h: torch.Tensor, k: int, n_fixed: int, cfg: LOBSConfig,
                 retrain: obs.ChunkHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer matrix (bias folded in as its last `n_fixed` columns) and its undamped
    Hessian -> (Ŵ, removed mask) with k weights removed by `cfg.variant`."""
    if cfg.variant is Variant.magnitude:
        return obs.magnitude(w, k, n_fixed)
    hd = obs.damped(h, cfg.damping)
    if cfg.variant is Variant.exact:
        return obs.exact_obs(w, hd, k, n_fixed, cfg.row_batch)
    if cfg.variant is Variant.sparsegpt:
        return obs.sparsegpt(w, hd, k, n_fixed, cfg.block_size)
    return obs.approx_lobs(w, hd, k, cfg.interval, n_fixed, retrain, cfg.damping)


def _clock(device: torch.device) -> float:
    """Wall seconds, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@register_method("lobs")
class LayerwiseOBS(Method):
    config = LOBSConfig
    uses_sparsity = True

    @classmethod
    def check(cls, cfg: LOBSConfig) -> None:
        super().check(cfg)
        if cfg.retrain_steps and cfg.variant is not Variant.approx:
            raise ConfigError(f"invalid value pruner.retrain_steps={cfg.retrain_steps}: retraining "
                              f"between prunes is part of variant approx only (variant="
                              f"{cfg.variant.value} takes 0); fine-tune with the finetune phase")
        if Phase.prune not in cfg.phases:
            raise ConfigError(f"invalid value pruner.phases={[p.value for p in cfg.phases]}: "
                              f"method 'lobs' prunes in a prune phase; add prune")

    def prune(self, run, calib) -> dict:
        rate = self.run_cfg.sparsity.percent / 100.0
        loss_before, acc_before = run.evaluate()
        hook = None
        if self.cfg.retrain_steps:
            def hook(name: str, layer: nn.Module, masks: Masks, upstream: bool) -> obs.ChunkHook:
                return self._chunk_hook(run, calib, name, layer, masks, upstream)
        masks, fields = prune_layers(run.model, run.prunable, calib.x, rate, self.cfg,
                                     dict(run.masks), hook)
        run.set_masks(masks)
        return {"variant": self.cfg.variant.value, "target_sparsity": rate,
                "test_loss_before_prune": loss_before, "test_acc_before_prune": acc_before,
                **fields}

    def _chunk_hook(self, run, calib, name: str, layer: nn.Module, masks: Masks,
                    upstream: bool) -> obs.ChunkHook:
        """After every `interval` prunes of this layer: write the weights, hold every mask so
        far, take `retrain_steps` masked training steps, and hand back the layer's weights and,
        when a layer before it changed, its new Hessian."""
        cfg = self.cfg
        key = f"{name}.weight"
        d_col = layer.weight[0].numel()

        def hook(w: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            obs.write_layer(layer, w, cfg.fold_bias)
            run.set_masks({**masks, key: masks[key] & ~removed[:, :d_col].reshape(layer.weight.shape)})
            self._retrain(run, cfg.retrain_steps)
            h = (obs.hessians(run.model, {name: layer}, calib.x, cfg.hessian_batch,
                              cfg.fold_bias)[name] if upstream else None)
            return obs.layer_matrix(layer, cfg.fold_bias), h

        return hook

    def _retrain(self, run, steps: int) -> None:
        """`steps` training steps on random training batches with the run's optimizer and the
        masks held (the batches come from the run's pruning generator, so resumes repeat them)."""
        model, x, y = run.model, run.data.x_train, run.data.y_train
        posterior = self.run_cfg.trainer.objective is Objective.posterior
        was_training = model.training
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (self.run_cfg.trainer.batch_size,),
                                generator=run.prune_gen).to(x.device)
            loss, _ = self.loss(model, x[idx], y[idx])
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run.grad_masker is not None:
                run.grad_masker()
            if posterior:
                add_prior_grad_(run.prior_weights, self.run_cfg.prior, len(x))
            run.optimizer.step()
        model.train(was_training)

    def final(self, run) -> dict:
        pruned = [h for h in run.history if h.get("phase") == Phase.prune.value]
        last = pruned[-1] if pruned else {}
        return {"target_sparsity": self.run_cfg.sparsity.percent / 100.0,
                "test_acc_pruned": last.get("test_acc"), "test_loss_pruned": last.get("test_loss"),
                "prune_seconds": sum(h.get("prune_seconds", 0.0) for h in pruned)}
