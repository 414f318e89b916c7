"""Model-size metrics defined once and reported for every run (ShrinkBench-style).

Sparsity is measured from the weights; compression is total / nonzero parameters; FLOPs are
theoretical multiply-accumulates of the dense network scaled by each layer's weight density.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import global_sparsity, layer_sparsity
from .models import weight_layers


def dense_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
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
    with torch.no_grad():
        model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    for h in hooks:
        h.remove()
    return macs


def size_metrics(model: nn.Module, prunable: dict[str, nn.Module],
                 input_shape: tuple[int, ...]) -> dict:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(p.count_nonzero()) for p in params)
    macs = dense_macs(model, input_shape)
    layers = weight_layers(model)
    density = {n: float(m.weight.count_nonzero()) / m.weight.numel() for n, m in layers.items()}
    return {
        "sparsity": global_sparsity(prunable),
        "sparsity_per_layer": layer_sparsity(prunable),
        "sparsity_all_params": 1.0 - nonzero / total,
        "params_total": total,
        "params_nonzero": nonzero,
        "prunable_total": sum(m.weight.numel() for m in prunable.values()),
        "prunable_nonzero": sum(int(m.weight.count_nonzero()) for m in prunable.values()),
        "compression": total / max(1, nonzero),
        "flops_dense": sum(macs.values()),
        "flops_nonzero": sum(macs[n] * density[n] for n in macs),
    }
