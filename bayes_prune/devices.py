"""Device and CPU-thread choice inside a job, safe under parallel launchers.

No launcher pins GPUs per job (ecosystem.md B1): every joblib worker sees every GPU, and loky
reuses workers between jobs (B8). So a job claims a GPU slot itself with an advisory file lock in
the sweep directory, chosen before any CUDA work, and releases it when the job ends. Jobs fill
GPUs round-robin: with 4 GPUs, jobs 1-4 get GPUs 0-3, jobs 5-8 share them in a second slot.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch


def auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(setting: str) -> None:
    """Raise ConfigError when `trainer.device` names a device this machine does not have."""
    from .config import ConfigError

    if setting.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(setting[5:]) if setting.startswith("cuda:") else 0
        if index >= count:
            raise ConfigError(f"invalid value trainer.device={setting!r}: this machine has "
                              f"{count} CUDA device(s); use trainer.device=auto or cpu")
    if setting == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                 and torch.backends.mps.is_available()):
        raise ConfigError("invalid value trainer.device='mps': MPS is not available here; use "
                          "trainer.device=auto or cpu")


def _claim_gpu(lock_dir: Path, n_gpus: int, max_slots: int = 64) -> tuple[int, IO] | None:
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(n_gpus * max_slots):
        gpu = slot % n_gpus
        f = open(lock_dir / f"gpu{gpu}.slot{slot // n_gpus}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return gpu, f
        except OSError:
            f.close()
    return None


@contextmanager
def job_device(setting: str, lock_dir: Path | None) -> Iterator[torch.device]:
    """The device for this job; under a parallel sweep on several GPUs, a claimed GPU of its own."""
    if setting != "auto":
        yield torch.device(setting)
        return
    device = auto_device()
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    claim = _claim_gpu(lock_dir, n_gpus) if (lock_dir is not None and n_gpus > 1) else None
    if claim is None:
        yield device
        return
    gpu, handle = claim
    try:
        yield torch.device(f"cuda:{gpu}")
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def threads_per_job(setting: int, parallel_jobs: int) -> int:
    """CPU threads for one job: the setting if > 0, else the cores shared among parallel jobs."""
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, parallel_jobs))
