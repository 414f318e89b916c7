"""The run directory's files: typed `metrics.json` and checkpoints, always written atomically."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from .schema import SCHEMA_VERSION

METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
MASKS = "masks.pt"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, allow_nan=True).encode()))


def save_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def read_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / METRICS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def versions() -> dict[str, str]:
    import hydra
    import torchvision

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "bayes_prune": __version__, "schema": str(SCHEMA_VERSION)}
