"""The networks of paper 000: FCN (Eq. 1) and CNN (Eq. 2), sized from the config and the data."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig, ModelName


def _mlp(in_features: int, hidden: list[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def build_fcn(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), *_mlp(c * h * w, list(cfg.hidden), num_classes))


def build_cnn(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        if h < 2 or w < 2:
            raise ValueError(f"model.channels={list(cfg.channels)}: too many conv-pool stages for "
                             f"input {input_shape}; use fewer channels entries")
        layers += [nn.Conv2d(c, out, cfg.kernel_size, padding=cfg.kernel_size // 2), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), *_mlp(c * h * w, list(cfg.hidden), num_classes))


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    builders = {ModelName.fcn: build_fcn, ModelName.cnn: build_cnn}
    return builders[cfg.name](cfg, input_shape, num_classes)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d layer by module name, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


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
