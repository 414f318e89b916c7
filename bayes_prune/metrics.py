"""Model-size metrics defined once and reported for every run (ShrinkBench-style).

Everything is counted against the dense reference architecture the run started from, so a
network whose units were cut out reports the same kind of numbers as one whose weights were
masked: sparsity is measured from the weights (cut entries count as pruned), compression is dense
parameters / remaining nonzero parameters, and MACs are theoretical multiply-accumulates per
example (`FlopCounterMode` counts FLOPs = 2 x MACs), scaled by each layer's weight density.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .masks import global_sparsity, layer_sparsity
from .models import weight_layers
from .structure import alive_units, widths


def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates per Linear/Conv2d layer for one example, from forward hooks."""
    macs: dict[str, int] = {}
    hooks = []
    for name, layer in weight_layers(model).items():
        def hook(mod, inp, out, name=name):
            if isinstance(mod, nn.Conv2d):
                macs[name] = out[0].numel() * mod.weight[0].numel()
            else:
                macs[name] = mod.weight.numel()
        hooks.append(layer.register_forward_hook(hook))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs


@dataclass(frozen=True)
class DenseReference:
    """Sizes of the dense network a run starts from: what every later size is compared with."""

    params: int
    weights: dict[str, int]  # weight entries per Linear/Conv2d layer
    macs: dict[str, int]
    units: dict[str, int]  # output units per hidden weight layer

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...]) -> DenseReference:
        return cls(params=sum(p.numel() for p in model.parameters()),
                   weights={n: m.weight.numel() for n, m in weight_layers(model).items()},
                   macs=layer_macs(model, input_shape), units=widths(model))


def size_metrics(model: nn.Module, prunable: dict[str, nn.Module], input_shape: tuple[int, ...],
                 dense: DenseReference) -> dict:
    params = list(model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in params)
    macs = layer_macs(model, input_shape)
    layers = weight_layers(model)
    density = {n: float(m.weight.count_nonzero()) / m.weight.numel() for n, m in layers.items()}
    alive = alive_units(model)
    return {
        "sparsity": global_sparsity(prunable, dense.weights),
        "sparsity_per_layer": layer_sparsity(prunable, dense.weights),
        "sparsity_all_params": 1.0 - nonzero / dense.params,
        "params_dense": dense.params,
        "params_total": sum(p.numel() for p in params),
        "params_nonzero": nonzero,
        "prunable_total": sum(dense.weights[n] for n in prunable),
        "prunable_nonzero": sum(int(m.weight.count_nonzero()) for m in prunable.values()),
        "compression": dense.params / max(1, nonzero),
        "macs_dense": sum(dense.macs.values()),
        "macs_nonzero": sum(macs[n] * density[n] for n in macs),
        "units_dense": dict(dense.units),
        "units_remaining": {n: alive.get(n, 0) for n in dense.units},
        "units_removed": {n: dense.units[n] - alive.get(n, 0) for n in dense.units},
    }
