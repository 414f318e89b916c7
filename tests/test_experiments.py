"""Every experiment file runs, in a tiny form: its first sweep point, on synthetic data of the
dataset's shape, one epoch per phase. A preset that composes but cannot run fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf

from bayes_prune.config import validate
from bayes_prune.data import input_shape
from bayes_prune.experiment import JobContext, run_experiment

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def first_sweep_point(experiment: str) -> list[str]:
    """`key=value` for the first value of every sweep parameter the experiment file sets."""
    params = OmegaConf.select(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"),
                              "hydra.sweeper.params", default=None) or {}
    out = []
    for key, values in params.items():
        text = str(values).strip()
        m = re.fullmatch(r"range\((\d+)(?:,.*)?\)", text)
        first = m[1] if m else text.split(",")[0].strip()
        out.append(f"{key}={first}")
    return out


def tiny(experiment: str) -> list[str]:
    point = first_sweep_point(experiment)
    cfg = validate(compose_cfg([f"experiment={experiment}", *point]))
    (c, h, w), classes = input_shape(cfg.dataset)
    overrides = [f"experiment={experiment}", *[o for o in point if not o.startswith("dataset=")],
                 "dataset=synthetic", f"dataset.shape=[{c},{h},{w}]", f"dataset.num_classes={classes}",
                 "dataset.n_train=96", "dataset.n_test=48", "trainer.epochs=1", "trainer.progress=off"]
    # the synthetic data already has the (resized) shape; normalising is for torchvision datasets
    overrides += [f"dataset.{k}=null" for k in ("resize", "normalise") if getattr(cfg.dataset, k) is not None]
    if cfg.pruner.finetune_epochs > 1:
        overrides.append("pruner.finetune_epochs=1")
    if cfg.pruner.cycles > 2:
        overrides.append("pruner.cycles=2")
    return overrides


def train_source(cfg, overrides: list[str]) -> None:
    """An experiment that starts from another run's network (`pruner.init_from`) gets that run
    first: the same tiny data and model, trained unpruned, where the experiment looks for it."""
    source = Path(cfg.pruner.init_from.replace("{seed}", str(cfg.seed)))
    dense = [*overrides, "pruner=none", "pruner.phases=[train]", "pruner.init_from=null"]
    record = run_experiment(validate(compose_cfg(dense)), JobContext(run_dir=source, overrides=dense))
    assert record["status"] == "done", record.get("error")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_file_runs_in_a_tiny_form(tmp_path, experiment):
    overrides = [*tiny(experiment), f"paths.output_dir={tmp_path}"]
    cfg = validate(compose_cfg(overrides))
    if cfg.pruner.init_from is not None:
        train_source(cfg, overrides)
    record = run_experiment(validate(compose_cfg(overrides)),
                            JobContext(run_dir=tmp_path / "run", overrides=overrides))
    assert record["status"] == "done", record.get("error")
    assert 0.0 <= record["final"]["test_acc"] <= 1.0
    assert record["history"], "a run records its phases"
