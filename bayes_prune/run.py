"""The state of one run: model, optimizer, masks, data, generators, position, history.

Methods change the state only through `set_masks` and `set_model`, so the mask mechanism, the
optimizer and the size accounting stay consistent, and `state_dict` / `load_state_dict` capture
everything a run needs to resume bit-identically, including a model whose units were cut out
(its layer widths are stored and the model is rebuilt to them before its weights are loaded).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .config import Config, ConfigError, Objective, Phase, to_dict
from .cudagraph import GraphedTrainer, use_cuda_graph
from .data import Data
from .evidence import Evidence, add_prior_grad_, evaluate
from .masks import GradMasker, Masks, apply_masks, weight_masks, zero_optimizer_state
from .methods.base import Method, Step
from .metrics import DenseReference
from .models import eval_batch_size, has_conv, weight_layers
from .record import MASKS, METRICS, WEIGHTS
from .structure import resize, widths
from .trainer import make_optimizer, train_epoch


@dataclass
class Position:
    """Where a run stands: cycle (1-based), index into `pruner.phases`, epochs done in that phase."""

    cycle: int = 1
    phase: int = 0
    epoch: int = 0


class RunState:
    def __init__(self, cfg: Config, method: Method, data: Data, device: torch.device) -> None:
        self.cfg, self.method, self.device = cfg, method, device
        self.data = data
        self.model = self._build()
        if has_conv(self.model):  # convolutions (max-pooling 7x) are much faster channels-last on CPU
            self.data = data.to(device, channels_last=True)
        self.dense = DenseReference.of(self.model, data.input_shape)
        self.eval_batch_size = eval_batch_size(self.model, device, cfg.trainer.eval_batch_size)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.prune_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.position = Position()
        self.history: list[dict] = []
        self.best: dict | None = None  # the best finetune epoch so far (pruner.finetune_select=best_val)
        self.wall_before = 0.0
        self.graph = use_cuda_graph(cfg.trainer.cuda_graph, device, type(method))
        self._bind()
        self.masks: Masks = weight_masks(self.prunable)
        self.grad_masker: GradMasker | None = GradMasker(self.model, self.masks)

    def _build(self, target_widths: dict[str, int] | None = None) -> nn.Module:
        data = self.data
        model = self.method.build_model(self.cfg.model, data.input_shape, data.num_classes)
        if target_widths:
            model = resize(model, target_widths, data.input_shape)
        fmt = torch.channels_last if has_conv(model) else torch.preserve_format
        return model.to(self.device, memory_format=fmt)

    def _bind(self) -> None:
        """(Re)derive what depends on the model's parameters."""
        self.optimizer = make_optimizer(self.model, self.cfg.trainer.lr, self.device,
                                        self.cfg.trainer.weight_decay, capturable=self.graph)
        self.prunable = self.method.prunable(self.model)
        self.prior_weights = [m.weight for m in weight_layers(self.model).values()]
        self.graphed: GraphedTrainer | None = None  # captured at the first epoch on CUDA

    # -- the only ways methods change the network -----------------------------------------------
    def set_masks(self, masks: Masks, persistent: bool = True) -> None:
        """Zero the masked entries and make `masks` the run's masks. Persistent masks are held:
        Adam's moments of the pruned entries are cleared and their gradients masked every step."""
        apply_masks(self.model, masks)
        self.masks = masks
        if persistent:
            zero_optimizer_state(self.optimizer, self.model, masks)
            self.grad_masker = GradMasker(self.model, masks)
        else:
            self.grad_masker = None
        if self.graphed is not None:
            self.graphed.set_masks(masks, persistent)

    def set_model(self, model: nn.Module, masks: Masks | None = None) -> None:
        """Replace the network (e.g. by a smaller one from `structure.cut`): a fresh optimizer,
        and `masks` (default: all kept) on the new parameters."""
        self.model = model.to(self.device)
        self._bind()
        self.masks = {}
        self.set_masks(masks if masks is not None else weight_masks(self.prunable))

    def start_from(self, source: Path) -> None:
        """Take a finished run's final network (`pruner.init_from`): its cut widths, weights and
        masks (on the layers both runs prune); the optimizer starts fresh."""
        arch = json.loads((source / METRICS).read_text())["final"]["architecture"]
        if arch["widths"]:
            self.model = self._build(arch["widths"])
            self._bind()
        self.model.load_state_dict(torch.load(source / WEIGHTS, map_location=self.device,
                                              weights_only=True))
        masks = weight_masks(self.prunable)
        if (source / MASKS).exists():
            stored = torch.load(source / MASKS, map_location=self.device, weights_only=True)
            masks.update({n: m for n, m in stored.items() if n in masks})
        self.set_masks(masks)

    # -- training and evaluation ----------------------------------------------------------------
    def train_epoch(self, epoch: int, phase: Phase, on_batches=None) -> tuple[float, float]:
        cfg, method = self.cfg, self.method
        posterior = cfg.trainer.objective is Objective.posterior
        n_train = len(self.data.x_train)
        if self.graph:
            if self.graphed is None:
                self.graphed = GraphedTrainer(
                    self.model, self.optimizer, self.data.x_train, self.data.y_train,
                    cfg.trainer.batch_size, method.loss, list(self.masks), self.prior_weights,
                    cfg.prior if posterior else None)
                self.graphed.set_masks(self.masks, self.grad_masker is not None)
            return self.graphed.epoch(self.shuffle_gen, on_batches)

        def before_step() -> None:
            if self.grad_masker is not None:
                self.grad_masker()
            if posterior:
                add_prior_grad_(self.prior_weights, cfg.prior, n_train)

        extra_loss = None
        if method.has_penalty():
            def extra_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                return method.penalty(self.model, Step(xb, yb, epoch, phase, n_train))

        return train_epoch(self.model, self.optimizer, self.data.x_train, self.data.y_train,
                           cfg.trainer.batch_size, self.shuffle_gen, loss_fn=method.loss,
                           before_step=before_step, extra_loss=extra_loss, on_batches=on_batches)

    def evidence(self, subsample: int | None, seed: int, predict) -> Evidence:
        """The log-likelihood pass over the training set (or a fixed subsample of it) that a
        method's Bayes factors use; a fleet member's is computed by its fleet."""
        return Evidence(self.data.x_train, self.data.y_train, self.eval_batch_size, subsample, seed,
                        predict)

    def evaluate(self) -> tuple[float, float]:
        """(mean test loss, test accuracy) of the network as it stands."""
        ce, correct = evaluate(self.model, self.data.x_test, self.data.y_test, self.eval_batch_size,
                               self.method.predict)
        n = len(self.data.y_test)
        return ce / n, correct / n

    def evaluate_val(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the validation set held out of the training set."""
        if self.data.x_val is None:
            raise ValueError("no validation set: set dataset.val_fraction")
        ce, correct = evaluate(self.model, self.data.x_val, self.data.y_val, self.eval_batch_size,
                               self.method.predict)
        n = len(self.data.y_val)
        return ce / n, correct / n

    @property
    def widths(self) -> dict[str, int]:
        """Output units of the hidden weight layers where they differ from the dense network."""
        return {n: w for n, w in widths(self.model).items() if w != self.dense.units.get(n)}

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "position": asdict(self.position), "widths": self.widths,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "masks": self.masks, "shuffle_gen": self.shuffle_gen.get_state(),
            "prune_gen": self.prune_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "method": self.method.state_dict(), "history": self.history,
            "persistent": self.grad_masker is not None, "best": self.best,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["widths"]:
            self.model = self._build(state["widths"])
            self._bind()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the checkpoint may come from an eager run
            group["capturable"] = self.graph
        self.graphed = None  # its capture holds the optimizer state tensors just replaced
        self.masks = {n: m.to(self.device) for n, m in state["masks"].items()}
        self.grad_masker = GradMasker(self.model, self.masks) if state["persistent"] else None
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.prune_gen.set_state(state["prune_gen"])
        torch.set_rng_state(state["torch_rng"])
        self.method.load_state_dict(state["method"])
        self.position = Position(**state["position"])
        self.history = state["history"]
        self.best = state.get("best")


def init_source(cfg: Config) -> Path | None:
    """The run directory `pruner.init_from` names for this run's seed, checked to be a finished
    run of the same dataset and model; None when it is not set."""
    if cfg.pruner.init_from is None:
        return None
    source = Path(cfg.pruner.init_from.replace("{seed}", str(cfg.seed)))
    where = f"pruner.init_from={cfg.pruner.init_from!r} ({source})"
    try:
        record = json.loads((source / METRICS).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"invalid value {where}: no readable {METRICS} there "
                          f"({type(exc).__name__}); train that run first") from None
    if not isinstance(record, dict) or record.get("status") != "done" or not (source / WEIGHTS).exists():
        raise ConfigError(f"invalid value {where}: that run is not done (status "
                          f"{record.get('status') if isinstance(record, dict) else None!r}); "
                          f"finish it first")
    mine = to_dict(cfg)
    for group in ("dataset", "model"):
        if record["config"].get(group) != mine[group]:
            raise ConfigError(f"invalid value {where}: that run has another {group} "
                              f"({record['config'].get(group)} vs {mine[group]})")
    return source


def load_model(run_dir: str | Path) -> nn.Module:
    """The final network of a finished run, rebuilt from its metrics.json and model.pt."""
    from .config import from_dict
    from .methods import method_class

    run_dir = Path(run_dir)
    record = json.loads((run_dir / METRICS).read_text())
    arch = record["final"]["architecture"]
    cfg = from_dict(record["config"])
    method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
    shape = tuple(arch["input_shape"])
    model = resize(method.build_model(cfg.model, shape, arch["num_classes"]), arch["widths"], shape)
    model.load_state_dict(torch.load(run_dir / WEIGHTS, weights_only=True))
    return model
