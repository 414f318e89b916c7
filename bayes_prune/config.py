"""Typed schemas behind every YAML option in `conf/`.

Each config group has one dataclass registered in Hydra's ConfigStore as `<group>/base`; every YAML
option starts with `defaults: [base]`, so a misspelt key or a wrong type fails at compose time.
Enums make OmegaConf reject unknown choices with the list of valid ones. Ranges are checked in
`__post_init__`, which runs when `validate()` turns the composed config into these objects, before
any data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and what is allowed."""


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {key}={value!r}: expected {allowed}")


class DatasetName(str, Enum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    digits = "digits"
    synthetic = "synthetic"


class ModelName(str, Enum):
    fcn = "fcn"
    cnn = "cnn"


class Method(str, Enum):
    none = "none"
    random = "random"
    magnitude = "magnitude"


class Gate(str, Enum):
    none = "none"  # always apply the candidate (the non-Bayes baselines)
    lagged = "lagged"  # apply iff the previous epoch's log BF > log beta (first prune unconditional)
    tentative = "tentative"  # apply iff this candidate's log BF > log beta


class Schedule(str, Enum):
    oneshot = "oneshot"
    gradual = "gradual"


class MaskMode(str, Enum):
    persistent = "persistent"
    regrow = "regrow"


class PriorName(str, Enum):
    gaussian = "gaussian"
    laplace = "laplace"


class Objective(str, Enum):
    posterior = "posterior"  # mean CE - log p(w) / n  (methods.md A6)
    likelihood = "likelihood"  # mean CE only


class Progress(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.mnist
    train_subset: int | None = None  # first-n subset of the training set (quick runs); None = all
    test_subset: int | None = None
    # synthetic only
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    n_train: int = 2048
    n_test: int = 512
    noise: float = 1.0

    def __post_init__(self) -> None:
        for key in ("train_subset", "test_subset"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"dataset.{key}", v, "null or an integer >= 1")
        _check(len(self.shape) == 3 and all(s >= 1 for s in self.shape), "dataset.shape",
               self.shape, "[channels, height, width] with every entry >= 1")
        _check(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "an integer >= 2")
        _check(self.n_train >= 1, "dataset.n_train", self.n_train, "an integer >= 1")
        _check(self.n_test >= 1, "dataset.n_test", self.n_test, "an integer >= 1")
        _check(self.noise >= 0, "dataset.noise", self.noise, "a number >= 0")


@dataclass
class ModelConfig:
    name: ModelName = ModelName.fcn
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512])
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn only
    kernel_size: int = 3  # cnn only

    def __post_init__(self) -> None:
        _check(all(h >= 1 for h in self.hidden), "model.hidden", self.hidden,
               "a list of widths >= 1")
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
               self.channels, "a non-empty list of channel counts >= 1")
        _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "model.kernel_size",
               self.kernel_size, "an odd integer >= 1")


@dataclass
class PrunerConfig:
    name: str = "none"
    method: Method = Method.none
    gate: Gate = Gate.none
    beta: float = 1.0  # Bayes-factor threshold: prune iff log BF > log(beta)
    schedule: Schedule = Schedule.oneshot
    ramp_start: int = 1  # gradual: first epoch that prunes
    ramp_epochs: int = 10  # gradual: epochs over which the cubic ramp reaches the target
    mask: MaskMode = MaskMode.persistent
    prune_output: bool = False  # methods.md A8: the output layer is spared by default

    def __post_init__(self) -> None:
        _check(self.beta > 0, "pruner.beta", self.beta, "a number > 0")
        _check(self.ramp_start >= 1, "pruner.ramp_start", self.ramp_start, "an integer >= 1")
        _check(self.ramp_epochs >= 1, "pruner.ramp_epochs", self.ramp_epochs, "an integer >= 1")


@dataclass
class PriorConfig:
    name: PriorName = PriorName.gaussian
    sigma: float = 1.0  # gaussian standard deviation
    scale: float = 1.0  # laplace scale b

    def __post_init__(self) -> None:
        _check(self.sigma > 0, "prior.sigma", self.sigma, "a number > 0")
        _check(self.scale > 0, "prior.scale", self.scale, "a number > 0")


@dataclass
class SparsityConfig:
    percent: float = 0.0  # target per-layer sparsity in percent

    def __post_init__(self) -> None:
        _check(0 <= self.percent < 100, "sparsity.percent", self.percent, "a number in [0, 100)")


@dataclass
class TrainerConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 25
    objective: Objective = Objective.posterior
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch CPU threads; 0 = torch's default (or the launcher's share)
    eval_batch_size: int | None = None  # test and evidence passes; None = measured default
    progress: Progress = Progress.auto

    def __post_init__(self) -> None:
        _check(self.optimizer == "adam", "trainer.optimizer", self.optimizer, "'adam'")
        _check(self.lr > 0, "trainer.lr", self.lr, "a number > 0")
        _check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        _check(self.threads >= 0, "trainer.threads", self.threads, "an integer >= 0")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1,
               "trainer.eval_batch_size", self.eval_batch_size, "null or an integer >= 1")
        dev = self.device
        _check(dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:")
               and dev[5:].isdigit()), "trainer.device", dev, "auto, cpu, cuda, cuda:N or mps")


@dataclass
class EvidenceConfig:
    """The log-posterior pass over the training set that the Bayes factor is computed from."""

    subsample: int | None = None  # estimate log p(D|w) on a fixed random subset, scaled to n

    def __post_init__(self) -> None:
        _check(self.subsample is None or self.subsample >= 1, "evidence.subsample",
               self.subsample, "null or an integer >= 1")


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    name: str = "default"  # sweep name: multiruns go to outputs/multirun/<name>/...
    resume: bool = True  # continue from the run directory's checkpoint; skip a finished run

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")


GROUPS = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "pruner": PrunerConfig,
    "prior": PriorConfig,
    "sparsity": SparsityConfig,
    "trainer": TrainerConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUPS.items():
        cs.store(group=group, name="base", node=schema)


def validate(cfg: DictConfig) -> Config:
    """Resolve the composed config into typed objects; raises ConfigError on a bad value."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj
