"""One training epoch over device-resident tensors: the hot path.

Each epoch draws one permutation, gathers the training set into that order once, and slices
contiguous batches from it. The optimizer is Adam with its fused kernel where the device has one.
The loss comes from the method (`Method.loss`, cross-entropy on logits by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite: the run stops with status `diverged`."""


# (model, x, y) -> (mean loss over the batch, logits or log-probabilities for the accuracy)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def make_optimizer(model: nn.Module, lr: float, device: torch.device,
                   weight_decay: float = 0.0, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam, fused where the device has the kernel; `capturable` keeps its step count on the
    device so that a CUDA graph can replay the step (cudagraph.py)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused,
                            capturable=capturable)


def batch_loop(n: int, batch_size: int, step: Callable[[int], None], loss_sum: torch.Tensor,
               correct: torch.Tensor, on_batches: Callable[[int, float, float], None] | None = None,
               report_every: int | None = None) -> tuple[float, float]:
    """Run `step(b)` for every batch b of an epoch over n examples; each step adds its batch's
    summed loss and correct predictions to the device tensors `loss_sum` and `correct`, which are
    read only every `report_every` batches (no host synchronisation in between). Returns (mean
    loss, accuracy); raises Diverged when the mean loss is NaN or infinite at a reading."""
    n_batches = (n + batch_size - 1) // batch_size
    report_every = report_every or min(50, max(1, n_batches // 20))
    for b in range(n_batches):
        step(b)
        if (b + 1) % report_every == 0 or b + 1 == n_batches:
            seen = min(n, (b + 1) * batch_size)
            mean = float(loss_sum) / seen
            if not math.isfinite(mean):
                raise Diverged(f"the training loss became {mean} by batch {b + 1} of {n_batches}")
            if on_batches is not None:
                on_batches(b + 1, mean, float(correct) / seen)
    return float(loss_sum) / n, float(correct) / n


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    loss_fn: LossFn = cross_entropy_loss,
    before_step: Callable[[], None] | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_batches: Callable[[int, float, float], None] | None = None,
    report_every: int | None = None,
) -> tuple[float, float]:
    """Train one epoch; returns (mean loss, accuracy) over the epoch's batches.

    `extra_loss(xb, yb)` is added to the batch loss (e.g. a method's KL term); the reported loss
    leaves it out. `before_step` runs between backward and the optimizer step (gradient masking,
    prior gradient). `on_batches(n_done, loss, acc)` is called every `report_every` batches for
    progress display (default: about 20 times an epoch, at most every 50 batches).
    """
    model.train()
    n = len(x)
    perm = torch.randperm(n, generator=generator).to(x.device)
    xp, yp = x[perm], y[perm]
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)

    def step(b: int) -> None:
        xb = xp[b * batch_size : (b + 1) * batch_size]
        yb = yp[b * batch_size : (b + 1) * batch_size]
        loss, logits = loss_fn(model, xb, yb)
        objective = loss if extra_loss is None else loss + extra_loss(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        with torch.no_grad():
            loss_sum.add_(loss.detach() * len(yb))
            correct.add_((logits.argmax(1) == yb).sum())

    return batch_loop(n, batch_size, step, loss_sum, correct, on_batches, report_every)
