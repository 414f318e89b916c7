"""Paper 003: the self-compressing Bayesian CNN (eVI) and its deterministic twin (methods.md §4).

`model=evi_cnn` is one 5x5 eVI convolution with N kernels, ReLU, 2x2 max-pooling, one eVI fully
connected layer and softmax, trained on the ELBO: the Gaussian likelihood of the one-hot label on
the propagated moments (`loss`) plus tau x KL (`penalty`, `pruner.kl`). `model=vanilla_cnn` is the
same architecture, deterministic, trained with cross-entropy. The pruner `self_compress` counts
the zero kernels of a trained network (posterior-mean Frobenius norm <= `pruner.threshold`) and
runs the iterative loop with the `compress` phase: retrain with N - Z kernels (`restart=scratch`,
a fresh network, or `warm`, the surviving kernels) until no zero kernel is left, at most
`pruner.cycles` trainings. In the last allowed cycle the zero kernels are removed without
retraining (the outputs do not change), so the final network never holds one the loop found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (
    ConfigError,
    DatasetConfig,
    MethodConfig,
    ModelConfig,
    Objective,
    Phase,
    check,
    is_finite,
)
from ..data import STATS
from ..evi import (
    EVIConv2d,
    EVILinear,
    EVIMaxPool2d,
    EVIReLU,
    EVISoftmax,
    gaussian_nll,
    kl_dera_tf1,
    kl_exact_gauss,
)
from ..evidence import evaluate
from ..models import register_model
from ..structure import cut, unit_layers
from ..trainer import cross_entropy_loss
from .base import Method, Step, register_method

log = logging.getLogger("bayes_prune")


class Covariance(str, Enum):
    full = "full"  # per-channel covariance blocks (exact, as a low-rank factor)
    diagonal = "diagonal"  # per-position variances only


class Init(str, Enum):
    tf1 = "tf1"  # means TruncNormal(0, 0.1), rho ~ U(-12, -2.2), FC bias 1e-5 (EVI_CNN_mnist.py)
    tf2 = "tf2"  # means N(0, 0.05), rho = -2.2 (VDP_CNN_MNIST.py)


INITS = {Init.tf1: (0.1, True, (-12.0, -2.2)), Init.tf2: (0.05, False, (-2.2, -2.2))}


class Pixels(str, Enum):
    unit = "unit"  # [0, 1] pixels as the eVI code feeds them: the model undoes the standardisation
    standardized = "standardized"  # the framework's standardised images as they are


class KL(str, Enum):
    dera_tf1_l1 = "dera_tf1_l1"  # the TF1 code's KL: L1 norm of the means (replication default)
    exact_gauss = "exact_gauss"  # the exact KL to N(0, I)


class Restart(str, Enum):
    scratch = "scratch"  # each cycle trains a fresh network with N - Z kernels
    warm = "warm"  # each cycle goes on from the trained kernels that are not zero


@dataclass
class VanillaCNNConfig(ModelConfig):
    name: str = "vanilla_cnn"
    kernels: int = 100  # N
    kernel_size: int = 5
    pool: int = 2
    init: Init = Init.tf1
    pixels: Pixels = Pixels.unit

    def __post_init__(self) -> None:
        check(self.kernels >= 1, "model.kernels", self.kernels, "an integer >= 1")
        check(self.kernel_size >= 1, "model.kernel_size", self.kernel_size, "an integer >= 1")
        check(self.pool >= 1, "model.pool", self.pool, "an integer >= 1")


@dataclass
class EVICNNConfig(VanillaCNNConfig):
    name: str = "evi_cnn"
    covariance: Covariance = Covariance.full


@dataclass
class SelfCompressConfig(MethodConfig):
    name: str = "self_compress"
    method: str = "self_compress"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.compress])
    cycles: int = 10  # at most this many trainings; the loop stops earlier when Z = 0
    kl: KL = KL.dera_tf1_l1
    tau: float = 0.002  # weight of the KL per training step (the TF1 code's tau)
    threshold: float = 1e-7  # a zero kernel has |M_k|_F <= threshold
    restart: Restart = Restart.scratch
    nll_eps: float = 1e-3  # Sigma_y + eps I in the likelihood
    clip_sigma_y: bool = True  # clamp Sigma_y to [1e-10, 1e10] first, as the TF1 code does

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite(self.tau) and self.tau >= 0, "pruner.tau", self.tau, "a finite number >= 0")
        check(is_finite(self.threshold) and self.threshold >= 0, "pruner.threshold",
              self.threshold, "a finite number >= 0")
        check(is_finite(self.nll_eps) and self.nll_eps > 0, "pruner.nll_eps", self.nll_eps,
              "a finite number > 0")
        check(Phase.train in self.phases, "pruner.phases", [p.value for p in self.phases],
              "a list with train")


# -- the networks --------------------------------------------------------------------------------


class PixelScale(nn.Module):
    """x * scale + shift per channel: the dataset's standardised images back to [0, 1] pixels."""

    def __init__(self, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def _pooled(size: int, cfg: VanillaCNNConfig) -> int:
    conv = size - cfg.kernel_size + 1
    if conv < 1:
        raise ConfigError(f"invalid value model.kernel_size={cfg.kernel_size}: larger than the "
                          f"input ({size} pixels)")
    return -(-conv // cfg.pool)  # max-pooling with "SAME" padding, as in the eVI code


class EVICNN(nn.Module):
    """conv (N kernels, VALID) -> ReLU -> max-pool -> FC -> softmax, every layer eVI.

    `forward(x)` propagates the moments: (mean (B, K), covariance (B, K, K)) of the softmax
    output. `logits(x)` is the mean path alone (the class scores mu_f, no covariance): what
    prediction needs, since mu_y = softmax(mu_f) does not depend on the covariances.
    """

    def __init__(self, cfg: EVICNNConfig, input_shape: tuple[int, int, int], num_classes: int,
                 pixels: PixelScale, kernels: int | None = None) -> None:
        super().__init__()
        c, h, w = input_shape
        n = kernels or cfg.kernels
        std, truncated, rho = INITS[cfg.init]
        self.cfg, self.input_shape, self.num_classes = cfg, tuple(input_shape), num_classes
        self.pixels = pixels
        self.conv = EVIConv2d(c, n, cfg.kernel_size, covariance=cfg.covariance.value,
                              mean_std=std, truncated=truncated, rho_range=rho)
        self.relu = EVIReLU()
        self.pool = EVIMaxPool2d(cfg.pool, ceil_mode=True)
        self.fc = EVILinear(n * _pooled(h, cfg) * _pooled(w, cfg), num_classes, mean_std=std,
                            truncated=truncated, rho_range=rho)
        self.softmax = EVISoftmax()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, cov = self.softmax(self.fc(self.pool(self.relu(self.conv(self.pixels(x))))))
        return mean, cov.blocks[:, 0]

    def logits(self, x: Tensor) -> Tensor:
        z = F.relu(F.conv2d(self.pixels(x), self.conv.weight))
        z = F.max_pool2d(z, self.cfg.pool, ceil_mode=True)
        return F.linear(z.flatten(1), self.fc.weight, self.fc.bias)

    @torch.no_grad()
    def cut_units(self, keep: dict[str, Tensor]) -> EVICNN:
        """The network with the kernels `keep["conv"] == False` removed (and their FC columns)."""
        idx = keep["conv"].to(self.conv.weight.device).nonzero().flatten()
        new = EVICNN(self.cfg, self.input_shape, self.num_classes, PixelScale(), len(idx))
        new = new.to(self.conv.weight.device)
        new.pixels.load_state_dict(self.pixels.state_dict())
        new.conv.weight.copy_(self.conv.weight[idx])
        new.conv.rho.copy_(self.conv.rho[idx])
        out, n = self.fc.out_features, self.conv.out_channels
        cols = self.fc.weight.view(out, n, -1)[:, idx].reshape(out, -1)
        new.fc.weight.copy_(cols)
        new.fc.rho.copy_(self.fc.rho)
        new.fc.bias.copy_(self.fc.bias)
        if self.conv.weight.is_contiguous(memory_format=torch.channels_last):
            new = new.to(memory_format=torch.channels_last)
        return new


def vanilla_cnn(cfg: VanillaCNNConfig, input_shape: tuple[int, int, int], num_classes: int,
                pixels: PixelScale, kernels: int | None = None) -> nn.Sequential:
    """The deterministic twin: the same layers and mean initialisation, one weight per entry."""
    c, h, w = input_shape
    n = kernels or cfg.kernels
    std, truncated, _ = INITS[cfg.init]
    net = nn.Sequential(pixels, nn.Conv2d(c, n, cfg.kernel_size, bias=False), nn.ReLU(),
                        nn.MaxPool2d(cfg.pool, ceil_mode=True), nn.Flatten(),
                        nn.Linear(n * _pooled(h, cfg) * _pooled(w, cfg), num_classes))
    with torch.no_grad():
        for layer in (net[1], net[5]):
            if truncated:
                nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
            else:
                nn.init.normal_(layer.weight, 0.0, std)
        net[5].bias.fill_(1e-5)
    return net


def pixel_scale(dataset: DatasetConfig, pixels: Pixels) -> PixelScale:
    """Undo the dataset's standardisation for `pixels=unit` (datasets without published
    statistics, e.g. synthetic, are fed as they are)."""
    if pixels is Pixels.unit and dataset.name in STATS:
        mean, std = STATS[dataset.name]
        return PixelScale(mean, std)
    return PixelScale()


@register_model("evi_cnn", EVICNNConfig)
def _evi_cnn_elsewhere(cfg: EVICNNConfig, input_shape, num_classes) -> nn.Module:
    raise ConfigError("invalid value model=evi_cnn for this pruner: the eVI CNN trains on its "
                      "ELBO under pruner=self_compress")


@register_model("vanilla_cnn", VanillaCNNConfig)
def _vanilla_cnn_elsewhere(cfg: VanillaCNNConfig, input_shape, num_classes) -> nn.Module:
    if cfg.pixels is Pixels.unit:
        raise ConfigError("invalid value model.pixels=unit for this pruner: it needs the dataset's "
                          "statistics, which pruner=self_compress supplies; use "
                          "model.pixels=standardized with other pruners")
    return vanilla_cnn(cfg, input_shape, num_classes, PixelScale())


def conv_layer(model: nn.Module) -> tuple[str, nn.Conv2d]:
    name, layer = next(iter(unit_layers(model).items()))
    return name, layer  # type: ignore[return-value]


def kernel_norms(model: nn.Module) -> Tensor:
    """||M_k||_F of every kernel (the whole d x d x C_in posterior-mean tensor)."""
    return conv_layer(model)[1].weight.detach().flatten(1).norm(dim=1)


@torch.no_grad()
def dead_kernels(model: nn.Module, x: Tensor, batch: int = 2000) -> Tensor:
    """Kernels whose mean pre-activation is <= 0 at every position of every image in x: their
    ReLU passes nothing, so the likelihood gives their means no gradient at all."""
    pixels = model.pixels if isinstance(model, EVICNN) else model[0]
    weight = conv_layer(model)[1].weight
    top = torch.full((weight.shape[0],), -torch.inf, device=weight.device)
    for i in range(0, len(x), batch):
        z = F.conv2d(pixels(x[i:i + batch]), weight)
        top = torch.maximum(top, z.amax((0, 2, 3)))
    return top <= 0


def storage_floats(model: nn.Module) -> int:
    """Conv-layer storage in floats: (d^2 C_in + 1) N for eVI (one variance per kernel), d^2 C_in N
    for the vanilla CNN (paper 003 §3.4)."""
    layer = conv_layer(model)[1]
    return layer.weight.numel() + (layer.rho.numel() if isinstance(layer, EVIConv2d) else 0)


# -- the method ----------------------------------------------------------------------------------


@register_method("self_compress")
class SelfCompress(Method):
    config = SelfCompressConfig
    objective = Objective.likelihood  # the ELBO carries its own prior (the KL)

    def __init__(self, cfg: SelfCompressConfig, run_cfg) -> None:
        super().__init__(cfg, run_cfg)
        self.cycles: list[dict] = []  # one summary per counted (trained) network

    def build_model(self, model_cfg: ModelConfig, input_shape: tuple[int, int, int],
                    num_classes: int, kernels: int | None = None) -> nn.Module:
        if not isinstance(model_cfg, VanillaCNNConfig):
            raise ConfigError(f"invalid value model={model_cfg.name} for pruner=self_compress: "
                              f"expected evi_cnn or vanilla_cnn")
        pixels = pixel_scale(self.run_cfg.dataset, model_cfg.pixels)
        if isinstance(model_cfg, EVICNNConfig):
            return EVICNN(model_cfg, input_shape, num_classes, pixels, kernels)
        return vanilla_cnn(model_cfg, input_shape, num_classes, pixels, kernels)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(model, EVICNN):
            return cross_entropy_loss(model, x, y)
        mean, cov = model(x)
        target = F.one_hot(y, mean.shape[1]).to(mean.dtype)
        clip = (1e-10, 1e10) if self.cfg.clip_sigma_y else None
        return gaussian_nll(mean, cov, target, self.cfg.nll_eps, clip).mean(), mean

    def penalty(self, model: nn.Module, step: Step) -> Tensor:
        if not isinstance(model, EVICNN):
            return torch.zeros((), device=step.x.device)
        kl = kl_dera_tf1 if self.cfg.kl is KL.dera_tf1_l1 else kl_exact_gauss
        return self.cfg.tau * sum(kl(m.weight, m.sigma2()) for m in (model.conv, model.fc))

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return F.log_softmax(model.logits(x), 1) if isinstance(model, EVICNN) else model(x)

    def epoch_end(self, run, epoch: int) -> dict:
        norms = kernel_norms(run.model)
        return {"kernels": len(norms), "zero_kernels": int((norms <= self.cfg.threshold).sum())}

    def _count(self, run) -> dict:
        """What the paper reports of a trained network: its zero kernels, their norms, variances."""
        model = run.model
        norms = kernel_norms(model)
        zero = norms <= self.cfg.threshold
        dead = dead_kernels(model, run.data.x_train)
        out = {"kernels": len(norms), "zero_kernels": int(zero.sum()),
               "dead_kernels": int(dead.sum()), "dead_kernel_ids": dead.nonzero().flatten().tolist(),
               "kernel_norms": norms.tolist(), "storage_floats": storage_floats(model)}
        if isinstance(model, EVICNN):
            s2 = model.conv.sigma2().detach()
            out["kernel_sigma2"] = s2.tolist()
            out["sigma2_zero_mean"] = float(s2[zero].mean()) if zero.any() else None
            out["sigma2_nonzero_mean"] = float(s2[~zero].mean()) if (~zero).any() else None
        return out

    def compress(self, run) -> dict:
        counted = self._count(run)
        test_loss, test_acc = run.evaluate()
        n, z = counted["kernels"], counted["zero_kernels"]
        summary = {"cycle": run.position.cycle, "test_acc": test_acc, "test_loss": test_loss,
                   **counted}
        if z == 0 or z == n:
            self.cycles.append(summary)
            log.info("cycle %d: %d kernels, %d zero kernels: %s", run.position.cycle, n, z,
                     "none left, the loop ends" if z == 0 else "all zero, nothing to retrain")
            return {"changed": False, "test_acc_trained": test_acc, **counted}
        name, _ = conv_layer(run.model)
        data = run.data
        smaller = cut(run.model, {name: kernel_norms(run.model) > self.cfg.threshold},
                      data.input_shape)
        ce, correct = evaluate(smaller, data.x_test, data.y_test, run.eval_batch_size, self.predict)
        summary["test_acc_removed"] = correct / len(data.y_test)
        self.cycles.append(summary)
        last = run.position.cycle >= self.cfg.cycles
        if self.cfg.restart is Restart.scratch and not last:
            smaller = self.build_model(run.cfg.model, data.input_shape, data.num_classes, n - z)
        run.set_model(smaller.to(run.device, memory_format=torch.channels_last))
        log.info("cycle %d: %d kernels, %d zero kernels (test acc %.4f, %.4f without them); %s",
                 run.position.cycle, n, z, test_acc, summary["test_acc_removed"],
                 "removed (last cycle)" if last else f"retraining with {n - z} "
                 f"({self.cfg.restart.value})")
        return {"test_acc_trained": test_acc, "test_acc_removed": summary["test_acc_removed"],
                "restart": "removed" if last else self.cfg.restart.value, **counted}

    def final(self, run) -> dict:
        norms = kernel_norms(run.model)
        floats = storage_floats(run.model)
        return {"kernels": len(norms), "zero_kernels": int((norms <= self.cfg.threshold).sum()),
                "kernels_initial": self.cycles[0]["kernels"] if self.cycles else len(norms),
                "zero_kernels_first": self.cycles[0]["zero_kernels"] if self.cycles else None,
                "kernel_norms": norms.tolist(), "storage_floats": floats,
                "storage_kb": floats * 4 / 1024, "cycles": self.cycles}

    def state_dict(self) -> dict:
        return {"cycles": self.cycles}

    def load_state_dict(self, state: dict) -> None:
        self.cycles = list(state.get("cycles", []))
