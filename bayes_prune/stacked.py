"""K runs of one architecture computed as one network: stacked parameters, batched matmuls,
grouped convolutions.

Member k's parameter `name` is row k of a (K, *shape) tensor. K Linear layers become one `baddbmm`
over (K, B, in) activations, K Conv2d layers one convolution with groups=K over (B, K*C, H, W).
Every member's outputs, losses and gradients stay its own (the members' mean losses are summed,
so each gradient is that member's), and Adam is elementwise, so one Adam over the stacked tensors
is K Adams. `Stack` gathers the members' weights, masks and Adam state before a pass and scatters
the results back after a training epoch, so between epochs each member's `RunState` holds exactly
what a single run holds (checkpoints and methods see nothing else).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .config import Objective
from .cudagraph import CapturedSteps, on_device
from .evidence import Evidence, add_prior_grad_
from .models import eval_batch_size, weight_layers
from .run import RunState

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
ACTIVATION_BUDGET = 2**29  # floats in one stacked evaluation activation on a GPU (2 GiB)


class Form(Enum):
    """How a stacked activation is laid out."""

    shared = "shared"  # (B, ...): the same input for every member (test set, full evidence pass)
    batched = "batched"  # (K, B, ...): member k's batch in row k
    grouped = "grouped"  # (B, K*C, H, W): member k's channels in group k


def stacking_problem(model: nn.Module) -> str | None:
    """Why `model` has no stacked form, or None when it has one."""
    if not isinstance(model, nn.Sequential):
        return f"the network is a {type(model).__name__}, not an nn.Sequential"
    for name, m in model.named_children():
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return f"layer {name} is a grouped or non-zero-padded convolution"
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return f"layer {name} flattens dims {m.start_dim}..{m.end_dim}, not 1..-1"
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Flatten, *ELEMENTWISE, *POOLS)):
            return f"layer {name} ({type(m).__name__}) has no stacked form"
    return None


def _grouped(x: torch.Tensor, form: Form) -> torch.Tensor:
    """A batched (K, B, C, H, W) activation as (B, K*C, H, W); grouped ones unchanged."""
    if form is Form.batched:
        k, b = x.shape[:2]
        return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
    return x


class StackedNet:
    """The forward pass of K copies of a `nn.Sequential` template, on stacked parameters."""

    def __init__(self, template: nn.Sequential) -> None:
        self.layers = list(template.named_children())
        first = next(m for _, m in self.layers if not isinstance(m, ELEMENTWISE))
        self.input_form = Form.grouped if isinstance(first, (nn.Conv2d, *POOLS)) else Form.batched

    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Member k's batch x[idx[k]] for all k, in the layout the first layer takes."""
        k, b = idx.shape
        if self.input_form is Form.grouped:  # example-major: (B*K, C, H, W) is (B, K*C, H, W)
            return x.index_select(0, idx.t().reshape(-1)).reshape(b, k * x.shape[1], *x.shape[2:])
        return x.index_select(0, idx.reshape(-1)).reshape(k, b, *x.shape[1:])

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor, form: Form) -> torch.Tensor:
        """Logits (K, B, classes) of every member; K is the leading size of `params`."""
        k = next(iter(params.values())).shape[0]
        for name, m in self.layers:
            w, b = params.get(f"{name}.weight"), params.get(f"{name}.bias")
            if isinstance(m, nn.Linear):
                if form is Form.shared:  # one GEMM over every member's output units
                    out = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))
                    x, form = out.view(len(x), k, -1).transpose(0, 1), Form.batched
                else:
                    x = torch.bmm(x, w.transpose(1, 2)) if b is None else torch.baddbmm(
                        b.unsqueeze(1), x, w.transpose(1, 2))
            elif isinstance(m, nn.Conv2d):
                weight, bias = w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1)
                groups = 1 if form is Form.shared else k
                x = F.conv2d(x if form is Form.shared else _grouped(x, form), weight, bias, m.stride,
                             m.padding, m.dilation, groups)
                form = Form.grouped
            elif isinstance(m, nn.Flatten):
                if form is Form.grouped:
                    x, form = x.reshape(len(x), k, -1).transpose(0, 1), Form.batched
                else:
                    x = x.flatten(1 if form is Form.shared else 2)
            elif isinstance(m, POOLS):
                x = m(_grouped(x, form))
                form = Form.shared if form is Form.shared else Form.grouped
            else:
                x = m(x)
        if form is Form.shared:
            x = x.unsqueeze(0).expand(k, *x.shape)
        return x


def largest_activation(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The most floats any layer of `model` outputs for one example."""
    sizes = [0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(out[0].numel()))
             for _, m in model.named_children()]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


def _param_list(run: RunState, names: list[str]) -> list[torch.Tensor]:
    params = dict(run.model.named_parameters())
    return [params[n] for n in names]


class Stack:
    """The weights, masks and Adam state of K runs stacked on their device; their training
    epochs and evaluation passes, eager or replayed from CUDA graphs (`graph`).

    The runs share the architecture, the training set and the trainer and prior settings; each
    keeps its own weights, masks, data order (its shuffle generator) and Adam state.
    """

    def __init__(self, runs: list[RunState], graph: bool) -> None:
        first = runs[0]
        self.runs, self.cfg, self.device = runs, first.cfg, first.device
        self.x, self.y = first.data.x_train, first.data.y_train
        self.net = StackedNet(first.model)  # type: ignore[arg-type]
        self.names = [n for n, _ in first.model.named_parameters()]
        self.member_params = [_param_list(r, self.names) for r in runs]
        with torch.no_grad():
            self.params = {n: torch.stack([p[i].detach() for p in self.member_params]).contiguous()
                           .requires_grad_() for i, n in enumerate(self.names)}
        trainer = self.cfg.trainer
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=trainer.lr,
                                          weight_decay=trainer.weight_decay, fused=fused,
                                          capturable=graph)
        for p in self.params.values():  # created here, so gathering can fill it in place
            step = (torch.zeros((), dtype=torch.float32, device=self.device) if fused or graph
                    else torch.tensor(0.0))
            self.optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)}
        self.mask_names = sorted({n for r in runs for n in r.masks})
        self.factors = [torch.ones_like(self.params[n]) for n in self.mask_names]
        self.prior_weights = [self.params[f"{n}.weight"] for n in weight_layers(first.model)]
        self.posterior = trainer.objective is Objective.posterior
        k = len(runs)
        self.loss_sum = torch.zeros(k, device=self.device)
        self.correct = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.steps = (CapturedSteps(self._step, self.optimizer,
                                    lambda: [*self.params.values(), self.loss_sum, self.correct])
                      if graph else self._step)
        base = eval_batch_size(first.model, self.device, trainer.eval_batch_size)
        act = largest_activation(first.model, first.data.input_shape)
        budget = ACTIVATION_BUDGET if self.device.type == "cuda" else base * act
        self.eval_batch = max(1, min(base, budget // (k * act)))

    # -- moving state between the members and the stack -------------------------------------------
    def _pairs(self, key: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Rows of the stacked parameters (key None) or of their Adam state `key`, and the
        members' tensors they correspond to (None where a member has no Adam state yet)."""
        stacked, own = [], []
        for i, n in enumerate(self.names):
            whole = self.params[n].detach() if key is None else self.optimizer.state[self.params[n]][key]
            for k, p in enumerate(self.member_params):
                stacked.append(whole[k])
                state = self.runs[k].optimizer.state.get(p[i])
                own.append(p[i].detach() if key is None else state[key] if state else None)
        return stacked, own

    @torch.no_grad()
    def _gather_params(self) -> None:
        torch._foreach_copy_(*self._pairs(None))

    def _states(self) -> list[dict | None]:
        """Each member's Adam state of its first parameter (None before its first step)."""
        return [r.optimizer.state.get(p[0]) for r, p in zip(self.runs, self.member_params, strict=True)]

    @torch.no_grad()
    def _gather_training_state(self) -> None:
        """Weights, Adam state and gradient masks of every member (they change between epochs:
        a prune clears the moments of the weights it removes)."""
        self._gather_params()
        states = self._states()
        fresh = not any(states)
        steps = [0.0] if fresh else torch.stack([s["step"] for s in states if s]).tolist()
        if not (fresh or all(states)) or len(set(steps)) > 1:
            raise RuntimeError(f"the members of a stack must have taken as many optimizer steps; "
                               f"found {sorted(set(steps))}{'' if all(states) else ' and none'}")
        for p in self.params.values():
            self.optimizer.state[p]["step"].fill_(steps[0])
        for key in ("exp_avg", "exp_avg_sq"):
            stacked, own = self._pairs(key)
            torch._foreach_zero_(stacked) if fresh else torch._foreach_copy_(stacked, own)
        rows, masks = [], []
        for name, factor in zip(self.mask_names, self.factors, strict=True):
            for k, run in enumerate(self.runs):
                held = run.grad_masker is not None and name in run.masks  # persistent masks
                rows.append(factor[k])
                masks.append(run.masks[name].to(factor.dtype) if held else torch.ones_like(factor[k]))
        if rows:
            torch._foreach_copy_(rows, masks)

    @torch.no_grad()
    def _scatter(self) -> None:
        """Weights and Adam state back into every member's model and optimizer."""
        stacked, own = self._pairs(None)
        torch._foreach_copy_(own, stacked)
        if all(self._states()):
            for key in ("exp_avg", "exp_avg_sq"):
                stacked, own = self._pairs(key)
                torch._foreach_copy_(own, stacked)
            for i, n in enumerate(self.names):
                step = self.optimizer.state[self.params[n]]["step"]
                for run, p in zip(self.runs, self.member_params, strict=True):
                    run.optimizer.state[p[i]]["step"].copy_(step)
            return
        for i, n in enumerate(self.names):  # after the first epoch: the members' state is created
            state = self.optimizer.state[self.params[n]]
            for k, (run, p) in enumerate(zip(self.runs, self.member_params, strict=True)):
                run.optimizer.state[p[i]] = {"step": state["step"].clone(),
                                             "exp_avg": state["exp_avg"][k].clone(),
                                             "exp_avg_sq": state["exp_avg_sq"][k].clone()}

    # -- training ---------------------------------------------------------------------------------
    def _step(self, idx: torch.Tensor) -> None:
        k, b = idx.shape
        self.optimizer.zero_grad(set_to_none=True)
        xb, yb = self.net.gather(self.x, idx), self.y[idx]
        logits = self.net(self.params, xb, self.net.input_form)
        losses = F.cross_entropy(logits.reshape(k * b, -1), yb.reshape(-1),
                                 reduction="none").view(k, b).mean(1)
        losses.sum().backward()
        with torch.no_grad():
            if self.factors:
                torch._foreach_mul_([self.params[n].grad for n in self.mask_names], self.factors)
            if self.posterior:
                add_prior_grad_(self.prior_weights, self.cfg.prior, len(self.x))
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += losses.detach() * b
            self.correct += (logits.argmax(-1) == yb).sum(1)

    def train_epoch(self, before_scatter: Callable[[], None] | None = None) -> list[tuple[float, float]]:
        """One epoch of every member, in its own data order; (mean loss, accuracy) per member
        (NaN for a member whose loss diverged: the others are unaffected). `before_scatter` runs
        before the results are written into the members (a fleet waits for their checkpoints)."""
        self._gather_training_state()
        n, size = len(self.x), self.cfg.trainer.batch_size
        perms = torch.stack([torch.randperm(n, generator=r.shuffle_gen) for r in self.runs])
        perms = perms.to(self.device)
        self.loss_sum.zero_()
        self.correct.zero_()
        with on_device(self.device):
            for b in range(0, n, size):
                self.steps(perms[:, b:b + size])
        if before_scatter is not None:
            before_scatter()
        self._scatter()
        return [(loss / n, correct / n)
                for loss, correct in zip(self.loss_sum.tolist(), self.correct.tolist(), strict=True)]

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _sums(self, members: list[int], x: torch.Tensor, y: torch.Tensor, form: Form
              ) -> tuple[list[float], list[int]]:
        """Summed cross-entropy (float64) and correct predictions of `members` over (x, y):
        shared by all, or one row per member (`form` batched)."""
        self._gather_params()
        idx = torch.tensor(members, device=self.device)
        params = (self.params if len(members) == len(self.runs)
                  else {n: p.index_select(0, idx) for n, p in self.params.items()})
        k = len(members)
        ce = torch.zeros(k, dtype=torch.float64, device=self.device)
        correct = torch.zeros(k, dtype=torch.int64, device=self.device)
        n = x.shape[0] if form is Form.shared else x.shape[1]
        for i in range(0, n, self.eval_batch):
            xb = x[i:i + self.eval_batch] if form is Form.shared else x[:, i:i + self.eval_batch]
            yb = y[i:i + self.eval_batch] if y.dim() == 1 else y[:, i:i + self.eval_batch]
            logits = self.net(params, xb, form)
            yk = yb.expand(k, -1) if yb.dim() == 1 else yb
            ce += F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), yk.reshape(-1),
                                  reduction="none").view(k, -1).sum(1)
            correct += (logits.argmax(-1) == yk).sum(1)
        return ce.tolist(), correct.tolist()

    def evaluate(self, members: list[int]) -> list[tuple[float, float]]:
        """(mean test loss, test accuracy) of each of `members` (indices into the stack)."""
        data = self.runs[0].data
        ce, correct = self._sums(members, data.x_test, data.y_test, Form.shared)
        n = len(data.y_test)
        return [(c / n, r / n) for c, r in zip(ce, correct, strict=True)]

    def log_likelihood(self, members: list[int], evidences: list[Evidence]) -> list[float]:
        """log p(D|w) of each of `members` over its own evidence set (the full training set, or
        its fixed subsample of it), scaled as `Evidence.log_likelihood` scales it."""
        first = evidences[0]
        shared = all(e.x.data_ptr() == first.x.data_ptr() and e.x.shape == first.x.shape
                     for e in evidences)
        if shared:
            ce, _ = self._sums(members, first.x, first.y, Form.shared)
        else:
            ce, _ = self._sums(members, torch.stack([e.x for e in evidences]),
                               torch.stack([e.y for e in evidences]), Form.batched)
        return [-c * e.scale for c, e in zip(ce, evidences, strict=True)]


def start_signature(run: RunState) -> tuple:
    """Runs stack together only from the same position with as many Adam steps taken."""
    return tuple(asdict(run.position).items()), bool(run.optimizer.state)

