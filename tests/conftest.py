from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = (ROOT.parent / "shared" / "datasets").resolve()
PYTHON = sys.executable

sys.path.insert(0, str(ROOT))
from bayes_prune.config import register_configs  # noqa: E402

register_configs()


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def mnist_root() -> Path | None:
    """The MNIST folder the real-data tests use: BAYES_PRUNE_DATA, else ../shared/datasets."""
    for root in (os.environ.get("BAYES_PRUNE_DATA"), str(SHARED_DATA)):
        if root and (Path(root) / "MNIST" / "raw").is_dir():
            return Path(root)
    return None


needs_mnist = pytest.mark.skipif(mnist_root() is None,
                                 reason="real MNIST not found (set BAYES_PRUNE_DATA)")


def train_cmd(*args: str) -> list[str]:
    return [PYTHON, str(ROOT / "train.py"), *args]


TIMING_KEYS = {"seconds", "evidence_seconds", "wall_seconds", "started_at", "updated_at", "run_dir",
               "threads"}


def strip_timings(obj):
    """A metrics record without the fields that may differ between identical runs."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj
