"""Read every run directory under a root into tidy pandas frames.

Broken runs are reported, never raised: an unreadable `metrics.json`, an unsupported schema, a
failed or a still-running run each get a row in `Collected.problems` with the reason. Readable runs
(done, running or failed) are in `runs` with their `status`; the table and figures use only `done`.

Which runs are seeds of one cell is derived from the recorded configs: two runs belong to the same
cell iff their result-relevant configs (`bayes_prune.schema.result_config`) are equal up to the
seed. The settings in which a cell differs from its neighbours are named in two labels:

    variant         the non-pruner settings (trainer.lr=0.01, dataset.train_subset=1000, ...)
                    that differ from the most common value among the runs of the same (dataset,
                    model, pruner), or every value of a setting when no value is the most common;
                    one table row per variant
    pruner_variant  the pruner settings (gate=tentative, schedule=gradual) that differ likewise;
                    the pruner's table column gets them as a suffix

Labels use a key's last component (`lr`, `gate`) unless two varying keys share it. A run with the
same result config and seed as an earlier one is a duplicate: it is listed as a problem and not
counted again.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bayes_prune.schema import (
    METRICS,
    SCHEMA_VERSION,
    find_run_dirs,
    flatten,
    lock_holder,
    result_config,
    upgrade,
)

KEYS = ["dataset", "model", "pruner", "sparsity_target", "variant", "pruner_variant", "seed"]
IDENTITY = {"dataset.name": "dataset", "model.name": "model", "pruner.name": "pruner",
            "sparsity.percent": "sparsity_target", "seed": "seed"}
SCALAR_CONFIG = {"pruner.method": "method", "pruner.gate": "gate", "trainer.epochs": "epochs",
                 "trainer.lr": "lr", "trainer.batch_size": "batch_size"}
FINAL_COLUMNS = ["test_acc", "test_loss", "sparsity", "compression", "params_total",
                 "params_nonzero", "wall_seconds", "epoch_target_reached"]
PROBLEM_COLUMNS = ["run_dir", "status", "reason"]


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per readable run
    history: pd.DataFrame  # one row per (run, history record)
    problems: pd.DataFrame  # run_dir, status, reason

    def status_counts(self) -> dict[str, int]:
        counts = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        for status in ("unreadable", "missing", "duplicate"):
            n = int((self.problems["status"] == status).sum())
            if n:
                counts[status] = n
        return {str(k): int(v) for k, v in sorted(counts.items())}


def _num(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _read(path: Path) -> tuple[dict | None, str | None]:
    if not path.exists():
        holder = lock_holder(path.parent)
        return None, (f"no metrics.json yet: held by pid {holder}, starting" if holder else
                      "no metrics.json: the job was stopped before its first record, or never ran")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable metrics.json: {type(exc).__name__}: {exc}"
    if not isinstance(data, dict):
        return None, "unreadable metrics.json: top level is not an object"
    data = upgrade(data)
    if data.get("schema_version") != SCHEMA_VERSION:
        return None, f"unsupported schema_version {data.get('schema_version')!r}"
    if not isinstance(data.get("config"), dict):
        return None, "metrics.json has no config"
    return data, None


def find_metrics(root: str | Path, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """The `metrics.json` path of every run directory under `root` (whether it exists or not: a
    run killed before its first write has none), skipping those inside `exclude` directories."""
    return [d / METRICS for d in find_run_dirs(root, tuple(Path(e) for e in exclude))]


def _settings(config: dict) -> dict[str, Any]:
    """Result-relevant config entries other than the ones that name the cell's position."""
    return {k: v for k, v in result_config(config).items() if k not in IDENTITY}


def _parse(data: dict, run_dir: str) -> tuple[dict[str, Any], list[dict], dict[str, Any], str | None]:
    """(run row, history rows, result settings, problem reason or None) of one record."""
    config = data["config"]
    flat = flatten(config)
    row: dict[str, Any] = {col: flat.get(key) for key, col in IDENTITY.items() | SCALAR_CONFIG.items()}
    row.update(dataset=str(row["dataset"]), model=str(row["model"]), pruner=str(row["pruner"]),
               sparsity_target=_num(row["sparsity_target"], 0.0),
               seed=int(_num(data.get("seed", row["seed"]), -1)),
               status=str(data.get("status", "unknown")), run_dir=run_dir, device=data.get("device"))
    history = [h for h in data.get("history") or [] if isinstance(h, dict)]
    final = data.get("final") or {}
    if not isinstance(final, dict):
        raise TypeError(f"final is a {type(final).__name__}, not an object")
    for key, value in final.items():
        if not isinstance(value, dict | list):
            row["epochs_run" if key == "epochs" else key] = value
    row.setdefault("epochs_run", len(history))
    hist = [{"run_dir": run_dir} | {k: v for k, v in h.items() if not isinstance(v, dict | list)}
            for h in history]
    err = data.get("error") or {}
    what = (f"{err.get('type', '?')}: {err.get('message', '')}" if isinstance(err, dict)
            else str(err)).strip()
    status = row["status"]
    if status in ("failed", "diverged"):
        reason = f"{status}: {what}"
    elif status == "interrupted":
        reason = f"interrupted after {len(history)} records: re-run its command to resume"
    elif status == "running":
        holder = lock_holder(run_dir)
        reason = (f"running (pid {holder}): {len(history)} records logged" if holder else
                  f"stopped while running after {len(history)} records (no process holds it: "
                  "killed?): re-run its command to resume")
    elif status == "done" and not final:
        reason = "done but has no final metrics"
        row["status"] = "incomplete"
    elif status != "done":
        reason = f"unknown status {status!r}"
    elif not math.isfinite(_num(final.get("test_acc"), math.nan)):
        reason = "done but final test_acc is missing or NaN (not counted in the table)"
    else:
        reason = None
    return row, hist, _settings(config), reason


def collect(root: str | Path, exclude: Iterable[str | Path] = ()) -> Collected:
    """Collect all runs under `root` (any depth); directories in `exclude` are skipped."""
    rows: list[dict[str, Any]] = []
    hist: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    for path in find_metrics(root, exclude):
        run_dir = str(path.parent)
        data, reason = _read(path)
        if data is None:
            status = "missing" if reason and reason.startswith("no metrics.json") else "unreadable"
            problems.append({"run_dir": run_dir, "status": status, "reason": reason})
            continue
        try:
            row, run_hist, run_settings, problem = _parse(data, run_dir)
        except Exception as exc:  # noqa: BLE001 - one malformed record must not stop the table
            problems.append({"run_dir": run_dir, "status": "unreadable",
                             "reason": f"malformed metrics.json: {type(exc).__name__}: {exc}"})
            continue
        rows.append(row)
        hist += run_hist
        settings.append(run_settings)
        if problem:
            problems.append({"run_dir": run_dir, "status": row["status"], "reason": problem})

    runs = pd.DataFrame(rows)
    for column in FINAL_COLUMNS:  # present even when no run has finished
        if column not in runs:
            runs[column] = math.nan
    if len(runs):
        runs["variant"], runs["pruner_variant"], runs["cell"] = _labels(runs, settings)
        runs, dups = _drop_duplicates(runs)
        problems += dups
        runs = runs.sort_values(["dataset", "model", "pruner", "sparsity_target", "variant",
                                 "pruner_variant", "seed", "run_dir"], ignore_index=True)
    else:
        runs = pd.DataFrame(columns=[*KEYS, "status", "run_dir", *FINAL_COLUMNS])
    history = pd.DataFrame(hist) if hist else pd.DataFrame(columns=["run_dir", "epoch"])
    if len(runs):
        history = runs[[*KEYS, "status", "run_dir"]].merge(history, on="run_dir", how="inner")
        order = [c for c in ("run_dir", "cycle") if c in history]
        history = history.sort_values(order, kind="stable", ignore_index=True)
    return Collected(runs, history, pd.DataFrame(problems, columns=PROBLEM_COLUMNS))


def _labels(runs: pd.DataFrame, settings: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(variant, pruner_variant, cell key) per run; see the module doc."""
    groups = list(zip(runs["dataset"], runs["model"], runs["pruner"], strict=True))
    modal: dict[tuple, dict[str, Any]] = {}
    for group in set(groups):
        members = [s for g, s in zip(groups, settings, strict=True) if g == group]
        keys = set().union(*members)
        modal[group] = {}
        for key in keys:
            top = Counter(_fmt(m.get(key)) for m in members).most_common(2)
            if len(top) == 1 or top[0][1] > top[1][1]:  # a tie has no reference: label all
                modal[group][key] = top[0][0]
    differing = [{k: v for k, v in s.items() if _fmt(v) != modal[g].get(k)}
                 for g, s in zip(groups, settings, strict=True)]
    varying = set().union(*differing)
    short = Counter(k.rsplit(".", 1)[-1] for k in varying)

    def label(d: dict[str, Any]) -> str:
        return ",".join(f"{k.rsplit('.', 1)[-1] if short[k.rsplit('.', 1)[-1]] == 1 else k}={_fmt(v)}"
                        for k, v in sorted(d.items()))

    variant = [label({k: v for k, v in d.items() if not k.startswith("pruner.")}) for d in differing]
    pruner_variant = [label({k: v for k, v in d.items() if k.startswith("pruner.")}) for d in differing]
    cells = [json.dumps({k: _fmt(v) for k, v in sorted(s.items())}) for s in settings]
    return variant, pruner_variant, cells


def _drop_duplicates(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Keep the first done run of every (cell, seed); later ones are problems, not counted."""
    key = ["dataset", "model", "pruner", "sparsity_target", "cell", "seed"]
    done = runs["status"] == "done"
    dup = done & runs[done].duplicated(key, keep="first").reindex(runs.index, fill_value=False)
    first = runs[done & ~dup].set_index(key)["run_dir"]
    problems = [{"run_dir": r["run_dir"], "status": "duplicate",
                 "reason": f"duplicate of {first.loc[tuple(r[k] for k in key)]} (same config and seed; "
                           "not counted again)"} for _, r in runs[dup].iterrows()]
    return runs[~dup].reset_index(drop=True), problems
