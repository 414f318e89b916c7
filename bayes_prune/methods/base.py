"""The interface every pruning method implements, and the registry of methods.

A run is config -> method -> phases -> record. The phases (`phases.py`) call the hooks below;
a method overrides only those it needs. Each hook gets the `RunState` (`run.py`): the model,
optimizer, masks, data and generators of the run, and the only ways to change them
(`run.set_masks`, `run.set_model`), so masks, checkpoints and size accounting stay the
framework's.

    build_model   build or wrap the network (noise layers, a moment-propagating net)
    loss          the training loss of one batch, and what its accuracy is read from
    predict       logits or log-probabilities for evaluation and the evidence pass
    penalty       an extra loss term that sees the batch, the epoch and the training-set size
    start         once the run state exists (e.g. set up an evidence pass)
    epoch_end     after every train-phase epoch: during-training pruning
    prune         the post-training `prune` phase, with a calibration set
    compress      the `compress` phase: rebuild the model smaller, or None (or fields with
                  `changed: False`) when nothing goes
    final         extra fields for metrics.json's `final`
    state_dict    method state a checkpoint must carry to resume bit-identically
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import Config, ConfigError, MethodConfig, ModelConfig, Objective, Phase
from ..models import build_model, prunable_layers
from ..trainer import cross_entropy_loss

if TYPE_CHECKING:
    from ..run import RunState

METHODS: dict[str, type[Method]] = {}


def register_method(key: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `@register_method("magnitude")` makes `pruner.method=magnitude` run it."""
    def decorate(cls: type[Method]) -> type[Method]:
        if key in METHODS and METHODS[key] is not cls:
            raise ValueError(f"method {key!r} is registered twice ({METHODS[key]} and {cls})")
        if cls.config.method != key:
            raise ValueError(f"{cls.config.__name__}.method must default to {key!r}")
        METHODS[key] = cls
        cls.key = key
        return cls
    return decorate


@dataclass(frozen=True)
class Step:
    """What `Method.penalty` sees: the batch, the 1-based epoch of the phase, the training-set size."""

    x: torch.Tensor
    y: torch.Tensor
    epoch: int
    phase: Phase
    n_train: int


@dataclass(frozen=True)
class Calibration:
    """Inputs and labels the prune phase may use (a fixed random subset of the training set)."""

    x: torch.Tensor
    y: torch.Tensor


class Method:
    """The unpruned baseline: trains, evaluates and never prunes. Subclasses override hooks."""

    key: ClassVar[str] = "none"
    config: ClassVar[type[MethodConfig]] = MethodConfig
    uses_sparsity: ClassVar[bool] = False  # does `sparsity.percent` change what the method does?
    # Can runs of this method train as members of a stacked fleet (`hydra/launcher=fleet`)? The
    # fleet computes their training epochs, test passes and `run.evidence` passes, so such a method
    # keeps the default network and loss and changes the weights only through `run.set_masks`.
    stackable: ClassVar[bool] = False
    # The trainer.objective this method's runs use, whatever the config says (`config.validate` sets
    # it, as it sets sparsity.percent=0 for methods that ignore it): `likelihood` for a method whose
    # loss is its whole objective, e.g. an ELBO with its own prior. None: the config's.
    objective: ClassVar[Objective | None] = None

    def __init__(self, cfg: MethodConfig, run_cfg: Config) -> None:
        self.cfg = cfg
        self.run_cfg = run_cfg

    @classmethod
    def check(cls, cfg: MethodConfig) -> None:
        """Raise ConfigError for settings this method cannot run; `config.validate` calls it
        before any data is loaded. Subclasses extend it."""
        for phase in (Phase.prune, Phase.compress):
            if phase in cfg.phases and getattr(cls, phase.value) is getattr(Method, phase.value):
                names = [p.value for p in cfg.phases]
                raise ConfigError(f"invalid value pruner.phases={names}: method {cls.key!r} has no "
                                  f"{phase.value} phase; expected phases among "
                                  f"{[p.value for p in cls.supported_phases()]}")

    @classmethod
    def supported_phases(cls) -> list[Phase]:
        return [p for p in Phase if p not in (Phase.prune, Phase.compress)
                or getattr(cls, p.value) is not getattr(Method, p.value)]

    # -- model and objective -------------------------------------------------------------------
    def build_model(self, model_cfg: ModelConfig, input_shape: tuple[int, int, int],
                    num_classes: int) -> nn.Module:
        return build_model(model_cfg, input_shape, num_classes)

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        """Layers whose weights the sparsity figures count."""
        return prunable_layers(model, self.cfg.prune_output)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_loss(model, x, y)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def penalty(self, model: nn.Module, step: Step) -> torch.Tensor:
        raise NotImplementedError  # only called when a subclass defines it

    @classmethod
    def has_penalty(cls) -> bool:
        return cls.penalty is not Method.penalty

    @classmethod
    def graph_safe(cls) -> bool:
        """Can the training step be replayed from a CUDA graph (cudagraph.py)? Yes with the default
        network and loss and no penalty: a custom one may read values on the host or change from
        step to step."""
        return (cls.loss is Method.loss and cls.build_model is Method.build_model
                and not cls.has_penalty())

    # -- phases --------------------------------------------------------------------------------
    def start(self, run: RunState) -> None:
        return None

    def epoch_end(self, run: RunState, epoch: int) -> dict:
        """Record fields for this epoch; `pruned: True` when the weights changed."""
        return {}

    def prune(self, run: RunState, calib: Calibration) -> dict:
        raise NotImplementedError

    def compress(self, run: RunState) -> dict | None:
        raise NotImplementedError

    def final(self, run: RunState) -> dict:
        return {}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
