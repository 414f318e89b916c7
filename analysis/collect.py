"""Read every run directory under a root into tidy pandas frames.

Broken runs are reported, never raised: an unreadable `metrics.json`, an unsupported schema, a
failed or a still-running run each get a row in `Collected.problems` with the reason. Readable runs
(done, running or failed) are in `runs` with their `status`; the table and figures use only `done`.

The `variant` column names the settings in which a run differs from the paper's defaults, as
comma-separated `key=value` pairs in a fixed order, "" when it differs in none of them:

    gate          bayes_* default lagged; baselines none        (e.g. "gate=tentative")
    beta          bayes_* only, default 1
    schedule      pruned runs only, default oneshot
    mask          pruned runs only, default persistent
    prune_output  pruned runs only, default false
    prior         default gaussian; then sigma (gaussian, default 1) or scale (laplace, default 1)
    objective     default posterior
    epochs        default: the most common value among the collected runs of the same
                  (dataset, model), so a quick grid with few epochs still has variant ""

Runs that agree on (dataset, model, pruner, sparsity_target, variant) are seeds of one cell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 1
KEYS = ["dataset", "model", "pruner", "sparsity_target", "variant", "seed"]
PRUNER_ONLY_KEYS = ("gate", "beta", "schedule", "mask", "prune_output")
HISTORY_FIELDS = [
    "train_loss", "train_acc", "test_loss", "test_acc", "test_loss_before_prune",
    "test_acc_before_prune", "log_prior", "log_likelihood", "log_bf", "gate_open", "pruned",
    "target_sparsity", "sparsity", "epoch_seconds", "evidence_seconds",
]
FINAL_COLUMNS = ["test_acc", "test_loss", "sparsity", "compression", "params_total",
                 "params_nonzero", "wall_seconds", "epoch_target_reached"]
PROBLEM_COLUMNS = ["run_dir", "status", "reason"]


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per readable run
    history: pd.DataFrame  # one row per (run, epoch)
    problems: pd.DataFrame  # run_dir, status, reason

    def status_counts(self) -> dict[str, int]:
        counts = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        unreadable = int((self.problems["status"] == "unreadable").sum())
        if unreadable:
            counts["unreadable"] = unreadable
        return {str(k): int(v) for k, v in sorted(counts.items())}


def _num(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _fmt(value: float) -> str:
    return f"{value:g}"


def _flatten_config(cfg: dict) -> dict[str, Any]:
    pruner = cfg.get("pruner") or {}
    prior = cfg.get("prior") or {}
    trainer = cfg.get("trainer") or {}
    return {
        "dataset": str((cfg.get("dataset") or {}).get("name", "?")),
        "model": str((cfg.get("model") or {}).get("name", "?")),
        "pruner": str(pruner.get("name", "?")),
        "method": str(pruner.get("method", "none")),
        "gate": str(pruner.get("gate", "none")),
        "beta": _num(pruner.get("beta"), 1.0),
        "schedule": str(pruner.get("schedule", "oneshot")),
        "mask": str(pruner.get("mask", "persistent")),
        "prune_output": bool(pruner.get("prune_output", False)),
        "prior": str(prior.get("name", "gaussian")),
        "sigma": _num(prior.get("sigma"), 1.0),
        "scale": _num(prior.get("scale"), 1.0),
        "objective": str(trainer.get("objective", "posterior")),
        "sparsity_target": _num((cfg.get("sparsity") or {}).get("percent"), 0.0),
        "epochs": int(_num(trainer.get("epochs"), 0)),
        "lr": _num(trainer.get("lr"), math.nan),
        "batch_size": int(_num(trainer.get("batch_size"), 0)),
    }


def variant_parts(row: dict[str, Any], default_epochs: int | None = None) -> list[str]:
    """The `key=value` pairs in which a run's settings differ from the defaults (see module doc)."""
    parts = []
    pruner = row["pruner"]
    bayes = pruner.startswith("bayes_")
    pruned = pruner != "none"
    if pruned and row["gate"] != ("lagged" if bayes else "none"):
        parts.append(f"gate={row['gate']}")
    if bayes and row["beta"] != 1.0:
        parts.append(f"beta={_fmt(row['beta'])}")
    if pruned and row["schedule"] != "oneshot":
        parts.append(f"schedule={row['schedule']}")
    if pruned and row["mask"] != "persistent":
        parts.append(f"mask={row['mask']}")
    if pruned and row["prune_output"]:
        parts.append("prune_output=true")
    if row["prior"] != "gaussian":
        parts.append(f"prior={row['prior']}")
    if row["prior"] == "gaussian" and row["sigma"] != 1.0:
        parts.append(f"sigma={_fmt(row['sigma'])}")
    if row["prior"] == "laplace" and row["scale"] != 1.0:
        parts.append(f"scale={_fmt(row['scale'])}")
    if row["objective"] != "posterior":
        parts.append(f"objective={row['objective']}")
    if default_epochs is not None and row["epochs"] != default_epochs:
        parts.append(f"epochs={row['epochs']}")
    return parts


def strip_keys(variant: str, keys: Iterable[str]) -> str:
    """`variant` without the pairs whose key is in `keys`."""
    keys = set(keys)
    return ",".join(p for p in variant.split(",") if p and p.split("=", 1)[0] not in keys)


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable metrics.json: {type(exc).__name__}: {exc}"
    if not isinstance(data, dict):
        return None, "unreadable metrics.json: top level is not an object"
    if data.get("schema_version") != SCHEMA_VERSION:
        return None, f"unsupported schema_version {data.get('schema_version')!r}"
    return data, None


def _is_within(path: Path, dirs: list[Path]) -> bool:
    return any(path.is_relative_to(d) for d in dirs)


def find_metrics(root: str | Path, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Every `metrics.json` under `root`, sorted, skipping those inside `exclude` directories."""
    excluded = [Path(e).resolve() for e in exclude]
    return sorted(p for p in Path(root).glob("**/metrics.json")
                  if p.is_file() and not _is_within(p.resolve(), excluded))


def collect(root: str | Path, exclude: Iterable[str | Path] = ()) -> Collected:
    """Collect all runs under `root` (any depth); directories in `exclude` are skipped."""
    rows: list[dict[str, Any]] = []
    hist: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for path in find_metrics(root, exclude):
        run_dir = str(path.parent)
        data, reason = _read(path)
        if data is None:
            problems.append({"run_dir": run_dir, "status": "unreadable", "reason": reason})
            continue
        row = _flatten_config(data.get("config") or {})
        row["seed"] = int(_num(data.get("seed", (data.get("config") or {}).get("seed")), -1))
        row["status"] = str(data.get("status", "unknown"))
        row["run_dir"] = run_dir
        row["device"] = data.get("device")
        history = [h for h in data.get("history") or [] if isinstance(h, dict)]
        final = data.get("final") or {}
        for key, value in final.items():
            if not isinstance(value, dict | list):
                row["epochs_run" if key == "epochs" else key] = value
        row.setdefault("epochs_run", len(history))
        rows.append(row)
        for h in history:
            hist.append({"run_dir": run_dir, "epoch": h.get("epoch")}
                        | {k: h.get(k) for k in HISTORY_FIELDS})

        if row["status"] == "failed":
            err = data.get("error") or {}
            reason = f"failed: {err.get('type', '?')}: {err.get('message', '')}".strip()
        elif row["status"] == "running":
            reason = f"running: {len(history)}/{row['epochs']} epochs logged"
        elif row["status"] == "done" and not final:
            reason = "done but has no final metrics"
            row["status"] = "incomplete"
        elif row["status"] != "done":
            reason = f"unknown status {row['status']!r}"
        elif not math.isfinite(_num(final.get("test_acc"), math.nan)):
            reason = "done but final test_acc is missing or NaN (not counted in the table)"
        else:
            continue
        problems.append({"run_dir": run_dir, "status": row["status"], "reason": reason})

    runs = pd.DataFrame(rows)
    for column in FINAL_COLUMNS:  # present even when no run has finished
        if column not in runs:
            runs[column] = math.nan
    if len(runs):
        runs = _add_variant(runs)
        runs = runs.sort_values(["dataset", "model", "pruner", "sparsity_target", "variant",
                                 "seed", "run_dir"], ignore_index=True)
    else:
        runs = pd.DataFrame(columns=[*KEYS, "status", "run_dir", *FINAL_COLUMNS])
    history = pd.DataFrame(hist, columns=["run_dir", "epoch", *HISTORY_FIELDS])
    if len(runs):
        history = runs[[*KEYS, "status", "run_dir"]].merge(history, on="run_dir", how="inner")
        history = history.sort_values(["run_dir", "epoch"], ignore_index=True)
    return Collected(runs, history, pd.DataFrame(problems, columns=PROBLEM_COLUMNS))


def _add_variant(runs: pd.DataFrame) -> pd.DataFrame:
    # Most common epochs per (dataset, model); ties go to the larger value.
    modal = {key: int(g.value_counts().sort_index(ascending=False).idxmax())
             for key, g in runs.groupby(["dataset", "model"])["epochs"]}
    runs = runs.copy()
    runs["variant"] = [
        ",".join(variant_parts(r, modal[(r["dataset"], r["model"])]))
        for r in runs.to_dict("records")
    ]
    return runs
