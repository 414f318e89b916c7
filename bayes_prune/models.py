"""Networks by name: a registry of model builders with their config schemas, and paper 000's nets.

A model is registered with `@register_model("name", SchemaDataclass)` on a builder
`(cfg, input_shape, num_classes) -> nn.Module`, plus `conf/model/<name>.yaml`. Builders return a
flat `nn.Sequential` where they can: `structure.py` then cuts units out of it generically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError, ModelConfig, check

Builder = Callable[[ModelConfig, tuple[int, int, int], int], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    schema: type[ModelConfig]
    build: Builder


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, schema: type[ModelConfig]) -> Callable[[Builder], Builder]:
    def decorate(build: Builder) -> Builder:
        MODELS[name] = ModelEntry(schema, build)
        return build
    return decorate


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if cfg.name not in MODELS:
        raise ConfigError(f"invalid value model.name={cfg.name!r}: expected one of {sorted(MODELS)}")
    return MODELS[cfg.name].build(cfg, tuple(input_shape), num_classes)  # type: ignore[arg-type]


@dataclass
class FCNConfig(ModelConfig):
    name: str = "fcn"
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512])

    def __post_init__(self) -> None:
        check(all(h >= 1 for h in self.hidden), "model.hidden", self.hidden, "a list of widths >= 1")


@dataclass
class CNNConfig(FCNConfig):
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
              self.channels, "a non-empty list of channel counts >= 1")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "model.kernel_size",
              self.kernel_size, "an odd integer >= 1")


def mlp(in_features: int, hidden: list[int], num_classes: int,
        activation: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), activation()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


@register_model("fcn", FCNConfig)
def build_fcn(cfg: FCNConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Paper 000 Eq. 1: ReLU hidden layers and a linear output (widths: methods.md A15)."""
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), *mlp(c * h * w, list(cfg.hidden), num_classes))


@register_model("cnn", CNNConfig)
def build_cnn(cfg: CNNConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Paper 000 Eq. 2: (conv-ReLU-maxpool) stages, then the FCN head (methods.md A16)."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        if h < 2 or w < 2:
            raise ConfigError(f"invalid value model.channels={list(cfg.channels)}: too many conv-pool "
                              f"stages for input {input_shape}; use fewer channels entries")
        layers += [nn.Conv2d(c, out, cfg.kernel_size, padding=cfg.kernel_size // 2), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), *mlp(c * h * w, list(cfg.hidden), num_classes))


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d layer by module name, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def prunable_layers(model: nn.Module, prune_output: bool) -> dict[str, nn.Module]:
    """The layers whose weight tensors are pruned: all but the output layer unless asked (A8)."""
    layers = weight_layers(model)
    if not prune_output:
        layers.pop(list(layers)[-1])
    return layers


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def eval_batch_size(model: nn.Module, device: torch.device, setting: int | None) -> int:
    """Batch size of the no-grad passes. Measured on the 2-core CPU: the FCN is fastest at 4096,
    the CNN at 256 (larger conv activations fall out of cache)."""
    if setting is not None:
        return setting
    if device.type != "cpu":
        return 8192
    return 256 if has_conv(model) else 4096
