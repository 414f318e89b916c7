"""BMRS networks: the multiplicative noise layer, the paper's MLP and LeNet5, and the export.

`LogUniformNoise` multiplies each unit (a neuron, or a conv channel broadcast over H x W) by a
noise variable theta with a truncated log-normal posterior (truncnorm.py). Training draws theta
per activation element, as the authors' code does; evaluation multiplies by E[theta]. The layer
is a unit carrier for `structure.py` (`unit_params`, `slice_units`), so unit masks cover its
parameters and `structure.cut` slices it with the units it follows.

`with_noise` puts a noise layer after the activation of every hidden weight layer of a plain
`nn.Sequential` (after tanh in the MLP, after ReLU in LeNet5, methods.md §3.1); the activation must
map 0 to 0, so a unit whose incoming weights and bias are masked outputs exactly 0 whatever its
theta. `export` folds each E[theta] into the next weight layer's input columns and drops the noise
layers: a plain network of Linear/Conv2d layers with the same test-time outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import bmrs_kernel, truncnorm
from .config import ConfigError, ModelConfig, check
from .models import register_model

ZERO_PRESERVING = (nn.Tanh, nn.ReLU)


class LogUniformNoise(nn.Module):
    """theta per unit: q(log theta) = N(mu, sigma^2) on [a, b], prior log-uniform on [e^a, e^b].

    `n_dense` is the layer's width before any cut: the mean KL of a layer divides by it, so a
    cut network's objective equals the masked network's (the authors average over all units of
    a layer, pruned ones included).
    """

    unit_params = ("mu", "logsigma")

    def __init__(self, units: int, a: float = truncnorm.A, b: float = truncnorm.B, init_mu: float = 0.0,
                 init_logsigma: float = -5.0, fused: bool = True, n_dense: int | None = None) -> None:
        super().__init__()
        self.a, self.b = float(a), float(b)
        self.fused = fused
        self.n_dense = units if n_dense is None else n_dense
        self._scratch: dict = {}  # the fused kernel's reusable buffer (bmrs_kernel._quantile_buffer)
        self.mu = nn.Parameter(torch.full((units,), float(init_mu)))
        self.logsigma = nn.Parameter(torch.full((units,), float(init_logsigma)))

    def extra_repr(self) -> str:
        return f"units={self.mu.numel()}, a={self.a:g}, b={self.b:g}"

    def sigma(self) -> torch.Tensor:
        return truncnorm.sigma_of(self.logsigma)

    def mean_theta(self) -> torch.Tensor:
        return truncnorm.mean_theta(self.mu, self.sigma(), self.a, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            return x * self.mean_theta().to(x.dtype).view(view)
        if self.fused and x.device.type == "cpu" and x.dtype == torch.float32 and bmrs_kernel.available():
            return bmrs_kernel.FusedNoise.apply(x, self.mu, self.logsigma, self.a, self.b,
                                                (truncnorm.LOGSIGMA_MIN, truncnorm.LOGSIGMA_MAX),
                                                truncnorm.SAMPLE_CLIP, self._scratch)
        eps = torch.rand_like(x)
        u = truncnorm.inverse_cdf(self.mu.view(view), self.sigma().view(view), eps, self.a, self.b)
        return x * torch.exp(u)

    def slice_units(self, idx: torch.Tensor) -> LogUniformNoise:
        new = LogUniformNoise(len(idx), self.a, self.b, fused=self.fused, n_dense=self.n_dense)
        with torch.no_grad():
            new.mu.copy_(self.mu[idx.to(self.mu.device)])
            new.logsigma.copy_(self.logsigma[idx.to(self.mu.device)])
        return new.to(self.mu.device)


def noise_layers(model: nn.Module) -> dict[str, LogUniformNoise]:
    """Noise layers keyed by the weight layer whose units they carry (the nearest Linear/Conv2d
    before them): the keys of unit decisions in `structure.unit_masks` and `structure.cut`."""
    out: dict[str, LogUniformNoise] = {}
    producer = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            producer = name
        elif isinstance(m, LogUniformNoise):
            if producer is None or producer in out:
                raise ValueError(f"noise layer {name} does not follow its own Linear/Conv2d layer")
            out[producer] = m
    return out


def kl_terms(layers: list[LogUniformNoise], averaging: str) -> torch.Tensor:
    """The KL term the authors add to the mean cross-entropy (methods.md §3.2): the mean over
    layers of each layer's mean KL (`mean`), or the plain sum over all units (`sum`); no 1/N."""
    weights = tuple((1.0 / (layer.n_dense * len(layers))) if averaging == "mean" else 1.0
                    for layer in layers)
    first = layers[0]
    if first.fused and first.mu.device.type == "cpu" and first.mu.dtype == torch.float32 \
            and bmrs_kernel.available():
        params = [p for layer in layers for p in (layer.mu, layer.logsigma)]
        return bmrs_kernel.FusedKL.apply(weights, first.a, first.b,
                                         (truncnorm.LOGSIGMA_MIN, truncnorm.LOGSIGMA_MAX), *params)
    # float64: with a posterior far in the tail the terms of the KL cancel to a few digits
    total = sum(w * truncnorm.kl_log_uniform(layer.mu.double(), layer.sigma().double(), layer.a,
                                             layer.b).sum()
                for w, layer in zip(weights, layers, strict=True))
    return total.to(first.mu.dtype)


def with_noise(model: nn.Module, **noise_kwargs) -> nn.Sequential:
    """`model` (a flat nn.Sequential) with a noise layer after the activation of each hidden
    Linear/Conv2d layer."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"BMRS noise layers need a flat nn.Sequential model, not {type(model).__name__}")
    layers = list(model)
    producers = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear | nn.Conv2d)]
    out: list[nn.Module] = []
    pending: int | None = None  # units of the last hidden producer still waiting for its noise
    for i, m in enumerate(layers):
        out.append(m)
        if isinstance(m, nn.Linear | nn.Conv2d) and i != producers[-1]:
            pending = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        elif pending is not None and isinstance(m, ZERO_PRESERVING):
            out.append(LogUniformNoise(pending, **noise_kwargs))
            pending = None
        elif pending is not None and not isinstance(m, nn.MaxPool2d | nn.Flatten | nn.Dropout):
            raise ConfigError(f"BMRS noise layers go after a Tanh or ReLU activation; layer {i} "
                              f"({type(m).__name__}) comes first")
    if pending is not None:
        raise ConfigError("BMRS noise layers need an activation after every hidden layer")
    return nn.Sequential(*out)


@torch.no_grad()
def export(model: nn.Module) -> nn.Sequential:
    """A plain network with the same test-time outputs: every noise layer's E[theta] folded into
    the input columns of the next weight layer (through pooling, which commutes with a positive
    per-channel scale, and Flatten), the noise layers removed."""
    out: list[nn.Module] = []
    scale: torch.Tensor | None = None  # per-channel multiplier waiting for the next weight layer
    for m in model:  # a flat nn.Sequential
        if isinstance(m, LogUniformNoise):
            scale = m.mean_theta() if scale is None else scale * m.mean_theta()
            continue
        if isinstance(m, nn.Linear | nn.Conv2d) and scale is not None:
            m, scale = _scaled_copy(m, scale), None
        out.append(copy.deepcopy(m))
    if scale is not None:
        raise ValueError("a noise layer after the output layer cannot be folded")
    return nn.Sequential(*out)


def _scaled_copy(layer: nn.Module, scale: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    w = new.weight
    if isinstance(layer, nn.Linear) and w.shape[1] != scale.numel():  # after a Flatten of C x H x W
        scale = scale.repeat_interleave(w.shape[1] // scale.numel())
    shape = (1, -1) + (1,) * (w.dim() - 2)
    w.mul_(scale.to(w.dtype).view(shape))
    return new


# -- models ---------------------------------------------------------------------------------------


@dataclass
class BMRSMLPConfig(ModelConfig):
    """The authors' `make_mlp`: Linear(in, H)-tanh, then `n_layers` x [Linear(H, H)-tanh], then
    Linear(H, classes): n_layers + 1 hidden layers (headline_numbers.md §2.3)."""

    name: str = "bmrs_mlp"
    hidden: int = 50
    n_layers: int = 5

    def __post_init__(self) -> None:
        check(self.hidden >= 1, "model.hidden", self.hidden, "an integer >= 1")
        check(self.n_layers >= 0, "model.n_layers", self.n_layers, "an integer >= 0")


@dataclass
class LeNet5Config(ModelConfig):
    """LeNet5 on 32 x 32 inputs as the BMRS code builds it: conv5x5 to 6k, ReLU, maxpool; conv5x5
    to 16k, ReLU, maxpool; FC 400k -> 120k -> 84k -> classes, ReLU between; k = `width` or, when
    null, the input channels (the authors' choice: 18/48/360/252 on CIFAR-10)."""

    name: str = "lenet5"
    width: int | None = None

    def __post_init__(self) -> None:
        check(self.width is None or self.width >= 1, "model.width", self.width, "null or an integer >= 1")


@register_model("bmrs_mlp", BMRSMLPConfig)
def build_bmrs_mlp(cfg: BMRSMLPConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, cfg.hidden), nn.Tanh()]
    for _ in range(cfg.n_layers):
        layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh()]
    layers.append(nn.Linear(cfg.hidden, num_classes))
    return nn.Sequential(*layers)


@register_model("lenet5", LeNet5Config)
def build_lenet5(cfg: LeNet5Config, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    if (h, w) != (32, 32):
        raise ConfigError(f"invalid model for input {input_shape}: LeNet5 takes 32 x 32 images "
                          f"(set dataset.resize=32)")
    k = cfg.width or c
    return nn.Sequential(
        nn.Conv2d(c, 6 * k, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6 * k, 16 * k, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400 * k, 120 * k), nn.ReLU(), nn.Linear(120 * k, 84 * k), nn.ReLU(),
        nn.Linear(84 * k, num_classes))
