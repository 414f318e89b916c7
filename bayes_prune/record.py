"""The run directory's files: typed `metrics.json` and checkpoints, always written atomically."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from .schema import CHECKPOINT, MASKS, METRICS, SCHEMA_VERSION, WEIGHTS

__all__ = ["CHECKPOINT", "MASKS", "METRICS", "WEIGHTS", "finite_json", "read_metrics", "save_torch",
           "versions", "write_json"]


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


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (non-finite floats become null)."""
    _atomic(path, lambda f: f.write(json.dumps(finite_json(obj), indent=2, allow_nan=False).encode()))


def save_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def read_metrics(run_dir: Path) -> dict | None:
    """The run directory's metrics.json, None if there is none; ValueError if it is not JSON."""
    try:
        text = (run_dir / METRICS).read_text()
    except FileNotFoundError:
        return None
    return json.loads(text)


def versions() -> dict[str, str]:
    import hydra
    import torchvision

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "bayes_prune": __version__, "schema": str(SCHEMA_VERSION)}
