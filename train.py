"""Entry point: `python train.py [group=option ...] [key=value ...]`, or `-m` for a sweep."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from bayes_prune import cli
from bayes_prune.config import ConfigError, register_configs, validate
from bayes_prune.data import DataError
from bayes_prune.experiment import RunDirError, run_experiment
from bayes_prune.record import write_json
from bayes_prune.schema import METRICS, SCHEMA_VERSION
from bayes_prune.trainer import Diverged

register_configs()
log = logging.getLogger("bayes_prune")


def _record_invalid_job(run_dir: Path, cfg: DictConfig, overrides: list[str], exc: Exception) -> None:
    """A sweep job whose config is invalid leaves a failed record, so the sweep's table lists it
    (never over another run's files)."""
    if (run_dir / METRICS).exists():
        return
    write_json(run_dir / METRICS, {
        "schema_version": SCHEMA_VERSION, "status": "failed", "run_dir": str(run_dir),
        "error": {"type": type(exc).__name__, "message": str(exc), "traceback": ""},
        "config": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
        "overrides": overrides, "history": [], "final": None})


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    cli.state["task_started"] = True
    job = cli.job_context(cfg)
    multirun, overrides = job.multirun, job.overrides
    try:
        record = run_experiment(validate(cfg), job)  # validation comes before any data is loaded
    except (ConfigError, DataError) as exc:
        if not multirun:
            if job.run_dir.is_dir() and not any(job.run_dir.iterdir()):
                job.run_dir.rmdir()  # Hydra made it for a run that never started
            cli.exit_bad_input(exc)
        log.error("%s", exc)  # in the job's log; the sweep reports it at the end
        if isinstance(exc, ConfigError) and not isinstance(exc, RunDirError):
            _record_invalid_job(job.run_dir, cfg, overrides, exc)
        raise
    except Diverged as exc:
        if not multirun:
            cli.exit_diverged(exc)
        raise
    return float((record.get("final") or {}).get("test_acc", math.nan))


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv))
