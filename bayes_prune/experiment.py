"""One run end to end: own its directory, skip or resume, run the phases, record the result.

`run_experiment` is what `train.py` calls. It holds a lock on the run directory while it works
(a second process asking for the same run waits, then finds it done), skips a run whose
`metrics.json` says done, resumes an interrupted one from `checkpoint.pt`, and leaves
`status: failed` with the traceback when anything raises.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import random
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import Config, ConfigError, to_dict
from .data import load_data
from .devices import job_device, threads_per_job
from .methods import method_class
from .metrics import size_metrics
from .phases import run_phases
from .progress import use_bars
from .record import CHECKPOINT, MASKS, METRICS, WEIGHTS, read_metrics, save_torch, versions, write_json
from .run import RunState
from .schema import SCHEMA_VERSION, result_config

log = logging.getLogger("bayes_prune")
LOCK = ".lock"


@dataclass
class JobContext:
    """What the launcher tells a job: where it writes, and how many jobs run beside it."""

    run_dir: Path
    overrides: list[str]
    multirun: bool = False
    parallel_jobs: int = 1
    lock_dir: Path | None = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_same_config(stored: dict, current: dict, where: Path) -> None:
    a, b = result_config(stored), result_config(current)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(
            f"run directory {where} holds a run with a different config (differs in: "
            f"{', '.join(diff)}); pick another hydra.run.dir, or pass resume=false to overwrite it")


@contextmanager
def own_run_dir(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory for this process; waits while another holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            log.info("run directory %s is in use by pid %s; waiting for it", run_dir,
                     f.read().strip() or "?")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_experiment(cfg: Config, job: JobContext) -> dict:
    """Run (or resume, or skip) one experiment; returns the final metrics.json content."""
    method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
    config = to_dict(cfg)
    with own_run_dir(job.run_dir):
        existing = read_metrics(job.run_dir)
        if cfg.resume and existing is not None:
            check_same_config(existing["config"], config, job.run_dir)
            if existing["status"] == "done":
                log.info("already done, skipping: %s", job.run_dir)
                return existing
        record = {
            "schema_version": SCHEMA_VERSION, "status": "running", "error": None,
            "run_dir": str(job.run_dir), "config": config, "overrides": job.overrides,
            "seed": cfg.seed, "device": None, "threads": None, "versions": versions(),
            "started_at": _now(), "updated_at": _now(), "history": [], "final": None,
        }
        try:
            with job_device(cfg.trainer.device, job.lock_dir) as device:
                threads = threads_per_job(cfg.trainer.threads, job.parallel_jobs)
                torch.set_num_threads(threads)
                record.update(device=str(device), threads=threads)
                bars = use_bars(cfg.trainer.progress, job.multirun)
                with logging_redirect_tqdm() if bars else nullcontext():
                    _run(cfg, method, record, job.run_dir, device, bars)
        except ConfigError:  # the directory belongs to another run: leave its files alone
            raise
        except BaseException as exc:
            record.update(status="failed", updated_at=_now(), error={
                "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()})
            write_json(job.run_dir / METRICS, record)
            log.error("run failed: %s: %s", type(exc).__name__, exc)
            raise
    return record


def _run(cfg: Config, method, record: dict, run_dir: Path, device: torch.device, bars: bool) -> None:
    seed_everything(cfg.seed)
    data = load_data(cfg.dataset, cfg.paths.data_dir, device)
    run = RunState(cfg, method, data, device)
    method.start(run)
    ckpt_path = run_dir / CHECKPOINT
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        check_same_config(ckpt["config"], record["config"], run_dir)
        run.load_state_dict(ckpt["run"])
        run.wall_before, record["started_at"] = ckpt["wall_seconds"], ckpt["started_at"]
        record["history"] = run.history
        log.info("resuming %s at cycle %d, phase %d, after epoch %d", run_dir, run.position.cycle,
                 run.position.phase, run.position.epoch)
    log.info("run dir: %s | device %s | pid=%d | %d train / %d test examples | %d parameters",
             run_dir, device, os.getpid(), len(data.x_train), len(data.x_test),
             sum(p.numel() for p in run.model.parameters()))
    t_start = time.perf_counter()

    def checkpoint() -> None:
        record["history"], record["updated_at"] = run.history, _now()
        save_torch(ckpt_path, {"config": record["config"], "run": run.state_dict(),
                               "wall_seconds": run.wall_before + time.perf_counter() - t_start,
                               "started_at": record["started_at"]})
        write_json(run_dir / METRICS, record)

    run_phases(run, bars, checkpoint)

    test_loss, test_acc = run.evaluate()
    record["final"] = {
        "test_acc": test_acc, "test_loss": test_loss,
        **size_metrics(run.model, run.prunable, run.data.input_shape, run.dense),
        **method.final(run),
        "architecture": {"model": record["config"]["model"], "widths": run.widths,
                         "input_shape": list(run.data.input_shape),
                         "num_classes": run.data.num_classes},
        "wall_seconds": run.wall_before + time.perf_counter() - t_start,
        "epochs": cfg.trainer.epochs,
    }
    save_torch(run_dir / WEIGHTS, run.model.state_dict())
    save_torch(run_dir / MASKS, {n: m.cpu() for n, m in run.masks.items()})
    record.update(status="done", updated_at=_now())
    write_json(run_dir / METRICS, record)
    f = record["final"]
    log.info("done: test_acc=%.4f sparsity=%.4f compression=%.2fx wall=%.1fs -> %s",
             f["test_acc"], f["sparsity"], f["compression"], f["wall_seconds"], run_dir)
