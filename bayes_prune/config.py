"""Typed schemas behind every YAML option in `conf/`, and their registration with Hydra.

The fixed groups (dataset, prior, sparsity, trainer) have one dataclass each, stored in Hydra's
ConfigStore as `<group>/base`. The open groups (model, pruner) have one dataclass per registered
model or method, derived from `ModelConfig` / `MethodConfig` and stored as
`schema/<group>/<key>`; a YAML option extends its schema with `defaults: [/schema/pruner/<key>@_here_]`.
So a misspelt key, a key of another method, a wrong type or an unknown choice fails at compose time.
Ranges are checked in `__post_init__`, which runs when `validate()` turns the composed config into
these objects, before any data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and what is allowed."""


def check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {key}={value!r}: expected {allowed}")


def is_finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


class DatasetName(str, Enum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    digits = "digits"
    synthetic = "synthetic"


class Phase(str, Enum):
    train = "train"  # trainer.epochs epochs, with the method's end-of-epoch step (during-training pruning)
    prune = "prune"  # post-training pruning with a calibration set of inputs and labels
    finetune = "finetune"  # pruner.finetune_epochs epochs with the masks fixed
    compress = "compress"  # the model is rebuilt smaller (units cut out)


class PriorName(str, Enum):
    gaussian = "gaussian"
    laplace = "laplace"


class FinetuneSelect(str, Enum):
    last = "last"  # the network after the last finetune epoch
    best_val = "best_val"  # the finetune epoch with the best validation accuracy (dataset.val_fraction)


class Objective(str, Enum):
    posterior = "posterior"  # mean loss - log p(w) / n  (methods.md A6)
    likelihood = "likelihood"  # mean loss only


class Progress(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class CudaGraph(str, Enum):
    auto = "auto"  # on CUDA, for methods whose step can be captured (cudagraph.py)
    on = "on"  # required: a run that cannot capture its step stops before any compute
    off = "off"  # eager steps


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.mnist
    train_subset: int | None = None  # first-n subset of the training set (quick runs); None = all
    test_subset: int | None = None
    resize: int | None = None  # bilinear resize to resize x resize (BMRS: MNIST at 32 x 32); None = as stored
    normalise: list[float] | None = None  # [mean, std] for every channel of [0, 1] pixels; None = the
    #                                       dataset's own statistics (torchvision datasets only)
    val_fraction: float | None = None  # hold out this fraction of the training set as a validation
    #                                    set (a fixed random split); None = no validation set
    # synthetic only
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    n_train: int = 2048
    n_test: int = 512
    noise: float = 1.0

    def __post_init__(self) -> None:
        for key in ("train_subset", "test_subset"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"dataset.{key}", v, "null or an integer >= 1")
        check(len(self.shape) == 3 and all(s >= 1 for s in self.shape), "dataset.shape",
              self.shape, "[channels, height, width] with every entry >= 1")
        check(self.resize is None or self.resize >= 1, "dataset.resize", self.resize,
              "null or an integer >= 1")
        check(self.normalise is None or (len(self.normalise) == 2 and all(map(is_finite, self.normalise))
                                         and self.normalise[1] > 0),
              "dataset.normalise", self.normalise, "null or [mean, std] with std > 0")
        check(self.normalise is None or self.name in (DatasetName.mnist, DatasetName.fashion_mnist,
                                                      DatasetName.cifar10),
              "dataset.normalise", self.normalise, "null for datasets other than mnist, "
              "fashion_mnist and cifar10")
        check(self.val_fraction is None or (is_finite(self.val_fraction) and 0 < self.val_fraction < 1),
              "dataset.val_fraction", self.val_fraction, "null or a number in (0, 1)")
        check(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "an integer >= 2")
        check(self.n_train >= 1, "dataset.n_train", self.n_train, "an integer >= 1")
        check(self.n_test >= 1, "dataset.n_test", self.n_test, "an integer >= 1")
        check(is_finite(self.noise) and self.noise >= 0, "dataset.noise", self.noise,
              "a finite number >= 0")


@dataclass
class ModelConfig:
    """Base of every model schema (see `models.py`); `name` is the registered model."""

    name: str = "fcn"


@dataclass
class MethodConfig:
    """Base of every pruning method's schema (see `methods/`).

    `name` is the option's name (`bayes_magnitude`), used in folders and tables; `method` is the
    registered method that runs it (`magnitude`), fixed by the schema.
    """

    name: str = "none"
    method: str = "none"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train])
    cycles: int = 1  # repeat `phases` up to this many times; a compress that removes nothing stops
    finetune_epochs: int = 0
    calibration_size: int = 1024  # training images (with labels) the prune phase sees
    prune_output: bool = False  # methods.md A8: the output layer is spared by default
    # start from the final network (weights, cut widths, masks) of a finished run directory
    # instead of a fresh initialisation; "{seed}" in it is replaced by the run's seed
    init_from: str | None = None
    finetune_select: FinetuneSelect | None = None  # which finetune epoch the run keeps; None = last

    def __post_init__(self) -> None:
        check(len(self.phases) >= 1, "pruner.phases", self.phases, "a non-empty list of phases")
        check(self.cycles >= 1, "pruner.cycles", self.cycles, "an integer >= 1")
        check(self.finetune_epochs >= 0, "pruner.finetune_epochs", self.finetune_epochs,
              "an integer >= 0")
        check(Phase.finetune not in self.phases or self.finetune_epochs >= 1,
              "pruner.finetune_epochs", self.finetune_epochs,
              "an integer >= 1 when pruner.phases has finetune")
        check(self.calibration_size >= 1, "pruner.calibration_size", self.calibration_size,
              "an integer >= 1")
        check(self.init_from is None or self.init_from.strip() != "", "pruner.init_from",
              self.init_from, "null or a run directory")


@dataclass
class PriorConfig:
    name: PriorName = PriorName.gaussian
    sigma: float = 1.0  # gaussian standard deviation
    scale: float = 1.0  # laplace scale b

    def __post_init__(self) -> None:
        # 1/sigma^2 enters the prior's gradient: it must be representable
        check(is_finite(self.sigma) and 1e-150 <= self.sigma, "prior.sigma", self.sigma,
              "a finite number > 0, at least 1e-150 (so that 1/sigma^2 is finite)")
        check(is_finite(self.scale) and 1e-300 <= self.scale, "prior.scale", self.scale,
              "a finite number > 0, at least 1e-300 (so that 1/scale is finite)")


@dataclass
class SparsityConfig:
    percent: float = 0.0  # target per-layer sparsity in percent

    def __post_init__(self) -> None:
        check(is_finite(self.percent) and 0 <= self.percent < 100, "sparsity.percent",
              self.percent, "a number in [0, 100)")


@dataclass
class TrainerConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0  # Adam's L2 term, on every parameter
    batch_size: int = 64
    epochs: int = 25
    objective: Objective = Objective.posterior
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default (or the launcher's share)
    eval_batch_size: int | None = None  # test and evidence passes; None = measured default
    progress: Progress = Progress.auto
    cuda_graph: CudaGraph = CudaGraph.auto  # replay each training step from a CUDA graph

    def __post_init__(self) -> None:
        check(self.optimizer == "adam", "trainer.optimizer", self.optimizer, "'adam'")
        check(is_finite(self.lr) and self.lr > 0, "trainer.lr", self.lr, "a finite number > 0")
        check(is_finite(self.weight_decay) and self.weight_decay >= 0, "trainer.weight_decay",
              self.weight_decay, "a finite number >= 0")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        check(self.threads >= 0, "trainer.threads", self.threads, "an integer >= 0")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1,
              "trainer.eval_batch_size", self.eval_batch_size, "null or an integer >= 1")
        dev = self.device
        check(dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:")
              and dev[5:].isdigit()), "trainer.device", dev, "auto, cpu, cuda, cuda:N or mps")


@dataclass
class EvidenceConfig:
    """The log-posterior pass over the training set that the Bayes factor is computed from."""

    subsample: int | None = None  # estimate log p(D|w) on a fixed random subset, scaled to n

    def __post_init__(self) -> None:
        check(self.subsample is None or self.subsample >= 1, "evidence.subsample",
              self.subsample, "null or an integer >= 1")


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruner: MethodConfig = field(default_factory=MethodConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    name: str = "default"  # sweep name: multiruns go to outputs/multirun/<name>/...
    resume: bool = True  # continue from the run directory's checkpoint; skip a finished run

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        parts = PurePath(self.name).parts
        check(bool(parts) and not PurePath(self.name).is_absolute() and ".." not in parts, "name",
              self.name, "a folder name under paths.output_dir/multirun (relative, without '..')")


FIXED_GROUPS = {
    "dataset": DatasetConfig,
    "prior": PriorConfig,
    "sparsity": SparsityConfig,
    "trainer": TrainerConfig,
}


def _sparsity_folder(method: str, percent: float) -> str:
    """The `sparsity=<s>` folder level: the target's value, 0 for methods that ignore it."""
    from .methods import method_class

    return f"{float(percent):g}" if method_class(method).uses_sparsity else "0"


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; importing the methods registers them)."""
    from .methods import METHODS
    from .models import MODELS

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in FIXED_GROUPS.items():
        cs.store(group=group, name="base", node=schema)
    for key, entry in MODELS.items():
        cs.store(group="schema/model", name=key, node=entry.schema)
    for key, cls in METHODS.items():
        cs.store(group="schema/pruner", name=key, node=cls.config)
    if not OmegaConf.has_resolver("bp_sparsity"):
        OmegaConf.register_new_resolver("bp_sparsity", _sparsity_folder)
    from .launcher import register_launcher

    register_launcher()  # hydra/launcher=fleet


def validate(cfg: DictConfig) -> Config:
    """Resolve the composed config into typed objects; raises ConfigError on a bad value.

    Methods that ignore the sparsity target get `sparsity.percent = 0`, so an unpruned run is one
    run per seed whatever `sparsity=` a sweep passed (it lands in the `sparsity=0` folder). A method
    with its own training objective (`Method.objective`) gets that `trainer.objective`.
    """
    from .methods import method_class
    from .schema import flatten

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    # A key added with `+` is not in any schema; OmegaConf would drop it without a word.
    known = flatten(to_dict(obj))
    for key in flatten(OmegaConf.to_container(cfg, resolve=False)):  # type: ignore[arg-type]
        if key not in known:
            group = key.rsplit(".", 1)[0]
            valid = sorted(k.rsplit(".", 1)[-1] for k in known if k.rsplit(".", 1)[0] == group)
            raise ConfigError(f"invalid key {key}: not a setting of this config (was it added with "
                              f"'+'?); the keys of {group} are {valid}")
    cls = method_class(obj.pruner.method)
    if not isinstance(obj.pruner, cls.config):
        raise ConfigError(f"invalid value pruner.method={obj.pruner.method!r}: the schema "
                          f"{type(obj.pruner).__name__} belongs to another method")
    cls.check(obj.pruner)
    if obj.pruner.finetune_select is FinetuneSelect.best_val and obj.dataset.val_fraction is None:
        raise ConfigError("invalid value pruner.finetune_select=best_val: it needs a validation set; "
                          "set dataset.val_fraction (e.g. 0.2)")
    if not cls.uses_sparsity:
        obj.sparsity.percent = 0.0
    if cls.objective is not None:
        obj.trainer.objective = cls.objective
    return obj


def to_dict(cfg: Config) -> dict:
    """The typed config as plain JSON-able data (what metrics.json records)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def from_dict(config: dict) -> Config:
    """A recorded config (metrics.json's `config`) back into typed objects."""
    from .methods import method_class
    from .models import MODELS

    model = OmegaConf.merge(OmegaConf.structured(MODELS[config["model"]["name"]].schema), config["model"])
    pruner = OmegaConf.merge(OmegaConf.structured(method_class(config["pruner"]["method"]).config),
                             config["pruner"])
    rest = OmegaConf.merge(OmegaConf.structured(Config),
                           {k: v for k, v in config.items() if k not in ("model", "pruner")})
    rest.model, rest.pruner = model, pruner
    obj = OmegaConf.to_object(rest)
    assert isinstance(obj, Config)
    return obj
