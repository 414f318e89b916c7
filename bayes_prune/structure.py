"""Units (neurons of a Linear, channels of a Conv2d) of a sequential network: unit masks and cuts.

One traversal of the network's leaf modules in forward order knows, for every unit of every
hidden weight layer, which entries belong to it: its weight row and bias entry, the per-unit
parameters of the modules it passes through (BatchNorm, a method's noise layer), and the input
columns of the next weight layer (one per spatial position after a Flatten). `unit_masks` turns
unit decisions into parameter masks for `masks.py`; `cut` builds the smaller network with those
units physically removed, whose outputs equal the masked network's.

A module that carries units without producing them (a noise layer, say) declares
`unit_params: tuple[str, ...]` (its parameters with one entry per unit along dim 0) and
`slice_units(idx) -> nn.Module` (a copy keeping only units `idx`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .masks import Masks

PRODUCERS = (nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules (and unit carriers) in registration order, which is forward order for the
    flat `nn.Sequential` nets the builders return."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, PRODUCERS + NORMS) or hasattr(m, "slice_units") or not any(m.children()):
            if not any(name.startswith(p + ".") for p, _ in out):
                out.append((name, m))
    return out


def unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight layers whose output units can be removed: every Linear/Conv2d but the output layer."""
    producers = {n: m for n, m in leaves(model) if isinstance(m, PRODUCERS)}
    producers.pop(list(producers)[-1])
    return producers


def _input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in leaves(model)]
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _walk(model: nn.Module, keep: dict[str, torch.Tensor], input_shape: tuple[int, ...]):
    """Yield (name, module, in_idx, out_idx): the kept input features and kept units of every leaf.

    `in_idx` indexes the module's input features (channels, or flattened columns after a
    Flatten); `out_idx` is set for weight layers only. Index tensors are on the CPU.
    """
    shapes = _input_shapes(model, input_shape)
    idx: torch.Tensor | None = None  # kept features of the current activation; None = all
    for name, m in leaves(model):
        if isinstance(m, nn.Flatten) and idx is not None:
            shape = shapes[name]
            spatial = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
            idx = (idx[:, None] * spatial + torch.arange(spatial)).flatten()
            yield name, m, None, None
        elif isinstance(m, PRODUCERS):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"layer {name}: grouped convolutions cannot be cut")
            out = keep.get(name)
            out_idx = None if out is None else out.detach().cpu().nonzero().flatten()
            yield name, m, idx, out_idx
            idx = out_idx
        else:
            yield name, m, idx, None


def unit_masks(model: nn.Module, keep: dict[str, torch.Tensor], input_shape: tuple[int, ...]
               ) -> Masks:
    """Parameter masks that remove the units with `keep[layer][unit] == False`.

    Covers each removed unit's weight row and bias entry, its entries in unit carriers, and the
    next weight layer's input columns. Layers missing from `keep` keep all their units.
    """
    masks: Masks = {}

    def put(pname: str, p: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None):
        m = masks.get(pname, torch.ones_like(p, dtype=torch.bool))
        if rows is not None:
            m = m & rows.to(p.device).view(-1, *[1] * (p.dim() - 1))
        if cols is not None:
            m = m & cols.to(p.device).view(1, -1, *[1] * (p.dim() - 2))
        masks[pname] = m

    def kept(n: int, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.bool)
        out[idx] = True
        return out

    for name, m, in_idx, out_idx in _walk(model, keep, input_shape):
        prefix = f"{name}." if name else ""
        if isinstance(m, PRODUCERS):
            rows = None if out_idx is None else kept(m.weight.shape[0], out_idx)
            cols = None if in_idx is None else kept(m.weight.shape[1], in_idx)
            if rows is not None or cols is not None:
                put(prefix + "weight", m.weight, rows, cols)
            if m.bias is not None and rows is not None:
                put(prefix + "bias", m.bias, rows, None)
        elif in_idx is not None:
            names = ("weight", "bias") if isinstance(m, NORMS) else getattr(m, "unit_params", ())
            for pname in names:
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter):
                    put(prefix + pname, p, kept(p.shape[0], in_idx), None)
    return masks


@torch.no_grad()
def cut(model: nn.Module, keep: dict[str, torch.Tensor], input_shape: tuple[int, ...]) -> nn.Module:
    """A copy of `model` with the units `keep[layer] == False` physically removed. A network that
    is not a flat sequence of standard layers (e.g. a moment-propagating one) cuts itself: it
    declares `cut_units(keep) -> nn.Module`."""
    if hasattr(model, "cut_units"):
        return model.cut_units(keep)
    new = copy.deepcopy(model)
    for name, m, in_idx, out_idx in _walk(model, keep, input_shape):
        replacement = None
        if isinstance(m, PRODUCERS):
            w = m.weight
            if out_idx is not None:
                w = w[out_idx]
            if in_idx is not None:
                w = w[:, in_idx]
            bias = None if m.bias is None else (m.bias if out_idx is None else m.bias[out_idx])
            if isinstance(m, nn.Linear):
                replacement = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            else:
                replacement = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding,
                                        m.dilation, bias=bias is not None, padding_mode=m.padding_mode)
            replacement = replacement.to(device=w.device, dtype=w.dtype)
            replacement.weight.copy_(w)
            if bias is not None:
                replacement.bias.copy_(bias)
            if w.dim() == 4 and m.weight.is_contiguous(memory_format=torch.channels_last):
                replacement = replacement.to(memory_format=torch.channels_last)
        elif in_idx is not None and isinstance(m, NORMS):
            replacement = type(m)(len(in_idx), m.eps, m.momentum, m.affine, m.track_running_stats)
            replacement = replacement.to(device=next(iter(m.state_dict().values())).device)
            replacement.load_state_dict({k: v[in_idx.to(v.device)] if v.dim() else v
                                         for k, v in m.state_dict().items()})
        elif in_idx is not None and hasattr(m, "slice_units"):
            replacement = m.slice_units(in_idx)
        if replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, child, replacement)
    return new


def widths(model: nn.Module) -> dict[str, int]:
    """Output units of every hidden weight layer: the architecture a checkpoint stores."""
    return {n: int(m.weight.shape[0]) for n, m in unit_layers(model).items()}


def resize(model: nn.Module, target: dict[str, int], input_shape: tuple[int, ...]) -> nn.Module:
    """`model` cut to `target` widths (keeping the first units): the shell `load_state_dict` fills
    when a compressed run resumes or its `model.pt` is reloaded."""
    current = widths(model)
    keep = {n: torch.arange(current[n]) < w for n, w in target.items() if w != current[n]}
    return cut(model, keep, input_shape) if keep else model


def alive_units(model: nn.Module) -> dict[str, int]:
    """Units per hidden weight layer whose weight row has any nonzero entry."""
    return {n: int((m.weight.detach().flatten(1) != 0).any(1).sum()) for n, m in unit_layers(model).items()}
