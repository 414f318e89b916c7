"""Entry point: `python train.py [group=option ...] [key=value ...]`, or `-m` for a sweep."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bayes_prune.cli import quote_numeric_choices
from bayes_prune.config import ConfigError, register_configs, validate
from bayes_prune.data import DataError
from bayes_prune.experiment import JobContext, run_experiment

register_configs()
log = logging.getLogger("bayes_prune")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None) if multirun else None
    if n_jobs is not None and n_jobs < 0:  # joblib: -1 = all cores, -2 = all but one, ...
        n_jobs = (os.cpu_count() or 1) + 1 + n_jobs
    job = JobContext(
        run_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        multirun=multirun,
        parallel_jobs=max(1, n_jobs or 1),
        lock_dir=Path(hc.sweep.dir) / ".gpu_locks" if multirun else None,
    )
    try:
        record = run_experiment(validate(cfg), job)  # validation comes before any data is loaded
    except (ConfigError, DataError) as exc:
        if isinstance(exc, ConfigError):  # a DataError is logged by run_experiment
            log.error("%s", exc)
        if not multirun:  # one clear line and exit status 2 instead of a traceback
            sys.exit(2)
        raise
    return float(record["final"]["test_acc"])


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    main()
