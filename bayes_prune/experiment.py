"""One run end to end: own its directory, skip or resume, run the phases, record the result.

`run_experiment` is what `train.py` calls. A run directory has one owner at a time: the process
holding its lock (`.lock`). Another process asking for a run that is held skips it; a finished run
is skipped without touching any of its files; a directory that holds another run's config or an
unreadable checkpoint is refused with a message, its files untouched. Only the owner writes
`.hydra/`, `train.log`, `metrics.json` and the checkpoints. A run ends `done`, `failed` (with the
traceback), `diverged` (a NaN or infinite loss) or `interrupted` (Ctrl-C); all but `done` resume
from the last checkpoint when the same command runs again.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import Config, ConfigError, to_dict
from .cudagraph import use_cuda_graph
from .data import input_shape, load_data
from .devices import auto_device, check_device, job_device, threads_per_job
from .methods import method_class
from .metrics import size_metrics
from .phases import run_phases
from .progress import use_bars
from .record import read_metrics, save_torch, versions, write_json
from .run import RunState
from .schema import (
    CHECKPOINT,
    HYDRA_DIR,
    LOCK,
    LOG,
    MASKS,
    METRICS,
    SCHEMA_VERSION,
    WEIGHTS,
    result_config,
)
from .trainer import Diverged

if TYPE_CHECKING:
    from .fleet import Seat

log = logging.getLogger("bayes_prune")


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (another run's config, a damaged file, no write
    permission); nothing in it was changed."""


class RunHeld(RuntimeError):
    """Another live process owns the run directory."""


@dataclass
class JobContext:
    """What the launcher tells a job: where it writes, and how many jobs run beside it."""

    run_dir: Path
    overrides: list[str]
    multirun: bool = False
    parallel_jobs: int = 1
    lock_dir: Path | None = None
    hydra_files: dict[str, str] = field(default_factory=dict)  # .hydra/<name>: YAML text
    seat: Seat | None = None  # set by the fleet launcher: the run is a member of a stacked fleet


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_same_config(stored: dict, current: dict, where: Path) -> None:
    a, b = result_config(stored), result_config(current)
    # a key missing from an older record equals null: options added later default to null
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise RunDirError(
            f"run directory {where} holds a run with a different config (differs in: "
            f"{', '.join(diff)}); pick another hydra.run.dir, or pass resume=false to overwrite it")


@contextmanager
def own_run_dir(run_dir: Path) -> Iterator[Callable[[], None]]:
    """Hold the run directory's lock or raise RunHeld; yields `claim()`, which writes our pid into
    the lock file once we decide to train (a skipped finished run is left as it was)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as exc:
        raise RunDirError(f"cannot write to run directory {run_dir}: {exc.strerror}; choose a "
                          f"writable hydra.run.dir or paths.output_dir") from exc
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise RunHeld(f.read().strip() or "?") from None

        def claim() -> None:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()

        try:
            yield claim
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Append this thread's log records to the run's train.log while it owns the run (the members
    of a fleet are threads of one process, each writing its own log)."""
    handler = logging.FileHandler(run_dir / LOG)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    owner = threading.get_ident()
    handler.addFilter(lambda record: record.thread == owner)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _write_hydra_files(run_dir: Path, files: dict[str, str]) -> None:
    if files:
        (run_dir / HYDRA_DIR).mkdir(exist_ok=True)
        for name, text in files.items():
            (run_dir / HYDRA_DIR / name).write_text(text)


def _existing_record(run_dir: Path) -> dict | None:
    try:
        record = read_metrics(run_dir)
    except ValueError as exc:
        raise RunDirError(f"{run_dir / METRICS} is unreadable ({exc}); move it away to start this "
                          f"run over, or pass resume=false") from exc
    if record is not None and not (isinstance(record.get("config"), dict)
                                   and isinstance(record.get("status"), str)):
        raise RunDirError(f"{run_dir / METRICS} is not a bayes_prune record (no config or status); "
                          f"move it away to start this run over, or pass resume=false")
    if record is not None and record.get("schema_version") != SCHEMA_VERSION:
        raise RunDirError(f"{run_dir} holds a run recorded by another bayes_prune version (schema "
                          f"{record.get('schema_version')!r}, this one writes {SCHEMA_VERSION}); "
                          f"analysis still reads it. Pick another hydra.run.dir, or pass "
                          f"resume=false to train it again here")
    return record


def check_buildable(cfg: Config, method) -> None:
    """Build the network on the meta device (no memory, no compute) to catch a model that does
    not fit the data's shape, and check the device exists, before any data is loaded."""
    check_device(cfg.trainer.device)
    device = auto_device() if cfg.trainer.device == "auto" else torch.device(cfg.trainer.device)
    use_cuda_graph(cfg.trainer.cuda_graph, device, type(method))
    shape, classes = input_shape(cfg.dataset)
    try:
        with torch.device("meta"):
            method.build_model(cfg.model, shape, classes)
    except ConfigError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"invalid model for input {shape}: {exc}") from exc


def run_experiment(cfg: Config, job: JobContext) -> dict:
    """Run (or resume, or skip) one experiment; returns its metrics.json content (for a run held
    by another process, a record with status `held`)."""
    method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
    check_buildable(cfg, method)
    config = to_dict(cfg)
    run_dir = job.run_dir
    try:
        with own_run_dir(run_dir) as claim:
            existing = _existing_record(run_dir) if cfg.resume else None
            if existing is not None:
                check_same_config(existing["config"], config, run_dir)
                if existing["status"] == "done":
                    log.info("already done, skipping: %s", run_dir)
                    return existing
            claim()
            _write_hydra_files(run_dir, job.hydra_files)
            with run_log(run_dir):
                return _own_run(cfg, method, config, job, existing)
    except RunHeld as held:
        log.warning("run directory %s is being trained by another process (pid %s); skipping it "
                    "here (run the command again later to check it finished)", run_dir, held)
        return {"status": "held", "run_dir": str(run_dir), "final": None}


def _own_run(cfg: Config, method, config: dict, job: JobContext, existing: dict | None) -> dict:
    run_dir = job.run_dir
    record = {
        "schema_version": SCHEMA_VERSION, "status": "running", "error": None,
        "run_dir": str(run_dir), "config": config, "overrides": job.overrides,
        "seed": cfg.seed, "device": None, "threads": None, "versions": versions(),
        "started_at": _now(), "updated_at": _now(),
        # until the checkpoint is loaded, keep what the directory already recorded
        "history": (existing or {}).get("history") or [], "resumes": [], "final": None,
    }
    try:
        placed = nullcontext(job.seat.device) if job.seat else job_device(cfg.trainer.device, job.lock_dir)
        with placed as device:
            threads = threads_per_job(cfg.trainer.threads, job.parallel_jobs)
            torch.set_num_threads(threads)
            record.update(device=str(device), threads=threads)
            write_json(run_dir / METRICS, record)  # visible as running from the first second
            bars = use_bars(cfg.trainer.progress, job.multirun)
            with logging_redirect_tqdm() if bars else nullcontext():
                _run(cfg, method, record, job, device, bars)
    except ConfigError:  # a bad input found late (e.g. a damaged checkpoint): files untouched
        raise
    except BaseException as exc:
        status = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                  else "diverged" if isinstance(exc, Diverged) else "failed")
        record.update(status=status, updated_at=_now(), error={
            "type": type(exc).__name__, "message": str(exc) or status,
            "traceback": traceback.format_exc()})
        write_json(run_dir / METRICS, record)
        if status == "interrupted":
            log.warning("interrupted: %s is resumable from its last checkpoint; run the same "
                        "command again to continue", run_dir)
        else:
            log.error("run %s: %s: %s", status, type(exc).__name__, exc)
        raise
    return record


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file is damaged
        raise RunDirError(
            f"{path} is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); the "
            f"run cannot resume from it. Delete it to restart this run from scratch (its "
            f"metrics.json is kept until then), or pass resume=false") from exc
    if not isinstance(ckpt, dict) or "run" not in ckpt or "config" not in ckpt:
        raise RunDirError(f"{path} was not written by this bayes_prune version and cannot be "
                          f"resumed; delete it to restart this run from scratch, or pass resume=false")
    return ckpt


def _run(cfg: Config, method, record: dict, job: JobContext, device: torch.device, bars: bool) -> None:
    run_dir = job.run_dir
    seed_everything(cfg.seed)
    ckpt_path = run_dir / CHECKPOINT
    ckpt = _load_checkpoint(ckpt_path, device) if cfg.resume and ckpt_path.exists() else None
    if ckpt is not None:
        check_same_config(ckpt["config"], record["config"], run_dir)
    data = (job.seat.load_data if job.seat else load_data)(cfg.dataset, cfg.paths.data_dir, device)
    run = (job.seat.run_state if job.seat else RunState)(cfg, method, data, device)
    method.start(run)
    if ckpt is not None:
        run.load_state_dict(ckpt["run"])
        run.wall_before, record["started_at"] = ckpt["wall_seconds"], ckpt["started_at"]
        record["history"] = run.history
        record["resumes"] = ckpt.get("resumes", []) + [
            {"at": _now(), "position": dict(ckpt["run"]["position"]), "threads": record["threads"],
             "device": record["device"]}]
        log.info("resuming %s at cycle %d, phase %d, after epoch %d", run_dir, run.position.cycle,
                 run.position.phase, run.position.epoch)
        before = ckpt.get("threads")
        if before is not None and before != record["threads"]:
            log.warning("this run started with %d CPU threads and resumes with %d: its numbers may "
                        "differ in the last bits from an uninterrupted run (set trainer.threads=%d "
                        "to resume bit-identically)", before, record["threads"], before)
    else:
        record["history"] = run.history
    log.info("run dir: %s | device %s | pid=%d | %d train / %d test examples | %d parameters",
             run_dir, device, os.getpid(), len(data.x_train), len(data.x_test),
             sum(p.numel() for p in run.model.parameters()))
    t_start = time.perf_counter()
    first_threads = ckpt.get("threads", record["threads"]) if ckpt else record["threads"]

    save = job.seat.save if job.seat else save_torch  # a fleet writes checkpoints in the background

    def checkpoint() -> None:
        record["history"], record["updated_at"] = run.history, _now()
        save(ckpt_path, {"config": record["config"], "run": run.state_dict(),
                          "wall_seconds": run.wall_before + time.perf_counter() - t_start,
                          "started_at": record["started_at"], "threads": first_threads,
                          "resumes": record["resumes"]})
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
