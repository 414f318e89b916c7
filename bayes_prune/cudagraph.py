"""Training steps replayed from CUDA graphs: one capture per batch size, no host sync per step.

A step `step(idx)` zeroes the gradients, gathers its batch by index from the device-resident
training set, runs forward, loss and backward, masks the gradients, adds the prior's gradient and
takes Adam's step (capturable, so its step count lives on the device). It is captured once for the
full batch size and once for the last partial batch, so every example of the epoch is used exactly
as in an eager epoch; each batch then costs one index copy into a static buffer and one replay.
Capture needs a few eager warm-up steps; they are undone (parameters, Adam state and the epoch's
sums restored), so the first replayed step starts from exactly the state an eager step would.

`trainer.cuda_graph=auto` captures on CUDA for methods whose step is capturable
(`Method.graph_safe`); `on` insists (an error before any compute otherwise), `off` keeps eager.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .config import ConfigError, CudaGraph, PriorConfig
from .evidence import add_prior_grad_
from .masks import Masks
from .trainer import LossFn, batch_loop


def use_cuda_graph(setting: CudaGraph, device: torch.device, method_cls) -> bool:
    """Whether a run on `device` replays its training steps from CUDA graphs."""
    if setting is CudaGraph.off:
        return False
    reason = None
    if device.type != "cuda":
        reason = f"the run's device is {device.type}, not CUDA"
    elif not method_cls.graph_safe():
        reason = (f"method {method_cls.key!r} changes the network, the loss or adds a penalty, and "
                  f"its step may synchronise with the host")
    if reason is not None and setting is CudaGraph.on:
        raise ConfigError(f"invalid value trainer.cuda_graph=on: {reason}; use trainer.cuda_graph="
                          f"auto (captures where it can) or off")
    return reason is None


def on_device(device: torch.device) -> AbstractContextManager:
    """Make `device` the current CUDA device (graphs are captured and replayed on the current
    one, and a run may train on cuda:1 from a thread whose current device is cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class CapturedSteps:
    """`step(idx)` replayed from a CUDA graph per batch size; `__call__(idx)` runs one step.

    `state()` lists what a step changes besides gradients (parameters, the epoch's sums); the
    optimizer's state is saved and restored around the warm-up too, including state Adam creates
    lazily (fresh state is zeros).
    """

    def __init__(self, step: Callable[[torch.Tensor], None], optimizer: torch.optim.Optimizer,
                 state: Callable[[], list[torch.Tensor]], warmup: int = 3) -> None:
        self.step, self.optimizer, self.state, self.warmup = step, optimizer, state, warmup
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, idx: torch.Tensor) -> None:
        key = tuple(idx.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(idx)
        graph, static = self.graphs[key]
        static.copy_(idx)
        graph.replay()

    @torch.no_grad()
    def _snapshot(self) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt = {i: {k: v.clone() for k, v in self.optimizer.state[p].items()}
               for i, p in enumerate(params) if self.optimizer.state.get(p)}
        return [t.detach().clone() for t in self.state()], opt

    @torch.no_grad()
    def _restore(self, saved: tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]) -> None:
        tensors, opt = saved
        for t, v in zip(self.state(), tensors, strict=True):
            t.copy_(v)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for k, v in self.optimizer.state[p].items():
                v.copy_(opt[i][k]) if i in opt else v.zero_()

    def _capture(self, idx: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        static = idx.clone()
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(static)
        self._restore(saved)
        return graph, static


class GraphedTrainer:
    """One run's training epochs with every step replayed from a CUDA graph.

    The same epoch as `trainer.train_epoch` with persistent masks and the posterior objective:
    one permutation of the shuffle generator per epoch, batches in that order, the loss and
    accuracy summed on the device and read every `report_every` batches. Mask factors are static
    buffers (1 where a weight is kept, or everywhere under regrowing masks), updated in place by
    `set_masks`, so a new mask needs no new capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, batch_size: int, loss_fn: LossFn, mask_names: list[str],
                 prior_weights: list[torch.Tensor], prior: PriorConfig | None) -> None:
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.batch_size, self.loss_fn = batch_size, loss_fn
        self.prior_weights, self.prior = prior_weights, prior
        params = dict(model.named_parameters())
        self.masked = [params[n] for n in mask_names]
        self.factors = [torch.ones_like(p) for p in self.masked]
        self.names = mask_names
        self.loss_sum = torch.zeros((), device=x.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=x.device)
        self.steps = CapturedSteps(self._step, optimizer,
                                   lambda: [*model.parameters(), self.loss_sum, self.correct])

    @torch.no_grad()
    def set_masks(self, masks: Masks, persistent: bool) -> None:
        for name, factor in zip(self.names, self.factors, strict=True):
            factor.copy_(masks[name]) if persistent and name in masks else factor.fill_(1.0)

    def _step(self, idx: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        xb, yb = self.x[idx], self.y[idx]
        loss, logits = self.loss_fn(self.model, xb, yb)
        loss.backward()
        with torch.no_grad():
            if self.masked:
                torch._foreach_mul_([p.grad for p in self.masked], self.factors)
            if self.prior is not None:
                add_prior_grad_(self.prior_weights, self.prior, len(self.x))
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(idx)
            self.correct += (logits.argmax(1) == yb).sum()

    def epoch(self, generator: torch.Generator, on_batches=None) -> tuple[float, float]:
        self.model.train()
        n, size = len(self.x), self.batch_size
        perm = torch.randperm(n, generator=generator).to(self.x.device)
        self.loss_sum.zero_()
        self.correct.zero_()
        with on_device(self.x.device):
            return batch_loop(n, size, lambda b: self.steps(perm[b * size:(b + 1) * size]),
                              self.loss_sum, self.correct, on_batches)
