"""The record schema of a run directory's `metrics.json`, and the run directory's layout.

This module is what training writes against and what `analysis` reads against (analysis may
import it and nothing else of the package's training side). It depends on the standard library
only.

    schema_version  SCHEMA_VERSION
    status          one of STATUSES (running, done, failed, diverged, interrupted)
    error           null, or {type, message, traceback} when status is failed, diverged or
                    interrupted
    run_dir, config (resolved), overrides, seed, device, threads (of this process), versions,
    started_at, updated_at, resumes (one {at, position, threads, device} per resume)
    history         one record per epoch of a train / finetune phase and per prune / compress
                    step: HISTORY_FIELDS, plus the method's own fields (e.g. log_bf, gate_open)
    final           FINAL_FIELDS, plus the method's own fields (e.g. target_sparsity)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
STATUSES = ("running", "done", "failed", "diverged", "interrupted")

# The files of a run directory.
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
MASKS = "masks.pt"
LOG = "train.log"
LOCK = ".lock"  # held (flock) by the process that trains the run; holds its pid
HYDRA_DIR = ".hydra"
RUN_MARKERS = (METRICS, CHECKPOINT, LOCK, HYDRA_DIR, LOG)

RUN_FIELDS = ("schema_version", "status", "error", "run_dir", "config", "overrides", "seed",
              "device", "threads", "versions", "started_at", "updated_at", "history", "resumes",
              "final")

HISTORY_FIELDS = {
    "phase": "train | prune | finetune | compress",
    "cycle": "1-based cycle of pruner.phases",
    "epoch": "1-based epoch within the phase (null for prune and compress)",
    "test_loss": "mean test cross-entropy of the network after this step",
    "test_acc": "test accuracy after this step",
    "sparsity": "fraction of the dense prunable weights that are zero or cut out",
    "sparsity_per_layer": "the same per prunable layer",
    "seconds": "wall time of the step",
}
EPOCH_FIELDS = {
    "train_loss": "mean training loss over the epoch's batches (without a method's penalty)",
    "train_acc": "training accuracy over the epoch's batches",
    "test_loss_before_prune": "test loss before the method's end-of-epoch step",
    "test_acc_before_prune": "test accuracy before the method's end-of-epoch step",
}

FINAL_FIELDS = {
    "test_acc": "test accuracy of the final network", "test_loss": "its mean test cross-entropy",
    "sparsity": "as in history", "sparsity_per_layer": "as in history",
    "sparsity_all_params": "1 - nonzero parameters / dense parameters",
    "params_dense": "parameters of the dense reference network",
    "params_total": "parameters of the final architecture (after cuts)",
    "params_nonzero": "nonzero parameters", "prunable_total": "dense prunable weights",
    "prunable_nonzero": "nonzero prunable weights",
    "compression": "params_dense / params_nonzero",
    "macs_dense": "multiply-accumulates per example of the dense network",
    "macs_nonzero": "MACs of the final network, each layer scaled by its weight density",
    "units_dense": "output units per hidden weight layer, dense",
    "units_remaining": "units with a nonzero weight row", "units_removed": "dense - remaining",
    "architecture": "{model: model config, widths: hidden-layer widths changed by cuts, "
                    "input_shape, num_classes}: what model.pt loads into",
    "wall_seconds": "training wall time, summed over resumes", "epochs": "trainer.epochs",
}

# Config keys that do not change a run's results: a run directory may be resumed under other
# values of them, and analysis does not tell runs apart by them.
NON_RESULT_KEYS = ("paths", "resume", "name", "trainer.device", "trainer.progress",
                   "trainer.threads", "trainer.eval_batch_size", "trainer.cuda_graph")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"trainer.lr": 0.001, ...}; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = tuple(value) if isinstance(value, list) else value
    return out


def is_result_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def result_config(config: dict) -> dict[str, Any]:
    """The flattened config without NON_RESULT_KEYS: what must match to resume a run."""
    return {k: v for k, v in flatten(config).items() if is_result_key(k)}


def upgrade(record: dict) -> dict:
    """A schema-1 record (before run phases) in schema-2 form; newer records unchanged."""
    if record.get("schema_version") != 1:
        return record
    out = dict(record, schema_version=SCHEMA_VERSION)
    out["history"] = [{"phase": "train", "cycle": 1, **{("seconds" if k == "epoch_seconds" else k): v
                                                        for k, v in h.items()}}
                      for h in record.get("history") or [] if isinstance(h, dict)]
    final = record.get("final")
    if isinstance(final, dict):
        renamed = {"flops_dense": "macs_dense", "flops_nonzero": "macs_nonzero"}
        out["final"] = {renamed.get(k, k): v for k, v in final.items()}
    return out


def find_run_dirs(root: str | Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Every run directory under `root`: a directory holding any of RUN_MARKERS, so that a run
    killed before it wrote metrics.json is found too. Sorted; directories inside `exclude` skipped."""
    excluded = [Path(e).resolve() for e in exclude]
    found = set()
    for marker in RUN_MARKERS:
        for p in Path(root).glob(f"**/{marker}"):
            d = p.parent
            if d.name == HYDRA_DIR or any(d.resolve().is_relative_to(e) for e in excluded):
                continue
            found.add(d)
    return sorted(found)


def lock_holder(run_dir: str | Path) -> int | None:
    """The pid of the live process that holds the run directory's lock, or None."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return int(path.read_text().strip() or 0) or -1
        except (OSError, ValueError):
            return -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
