"""`python -m analysis.lobs RUNS_DIR [--out DIR]`: paper 001's figure from `lobs` runs.

Test accuracy against the remaining fraction of prunable weights (measured, 1 - realised
sparsity) for every `lobs` pruner under RUNS_DIR, each without fine-tuning (the accuracy right
after the prune phase) and with it (the final accuracy), the dense `none` run of the same
dataset and model as the 1.0 point; the L-OBS paper's reference point (7 % remaining, 1.82 %
error after retraining, recalled and unverified: `reference/headline_numbers.md` §1.2) is
marked. Writes `lobs.png`, `lobs.pdf`, `lobs.csv` (one row per method, stage and target:
mean, std and n over seeds, the per-layer reconstruction errors and the pruning seconds) and
`lobs.md` / `lobs.tex` (accuracy by method and remaining fraction) into DIR (default
RUNS_DIR/analysis_lobs, which collection skips).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .collect import collect
from .figures import save_figure

METHOD_NAMES = {"lobs_magnitude": "Magnitude", "lobs_approx": "L-OBS approx (paper 001)",
                "lobs_approx_retrain": "L-OBS approx + retraining (paper 001)",
                "lobs_sparsegpt": "SparseGPT", "lobs": "Exact OBS (OBC)"}
ORDER = list(METHOD_NAMES)
COLOURS = {"lobs_magnitude": "tab:green", "lobs_approx": "tab:orange",
           "lobs_approx_retrain": "tab:red", "lobs_sparsegpt": "tab:purple", "lobs": "tab:blue"}
STAGES = {"pruned": "no fine-tuning", "finetuned": "after fine-tuning"}
# headline_numbers.md §1.2 (UNVERIFIED recall of the L-OBS paper's Table 1): LeNet-300-100,
# CR 7 %, error 1.82 % after retraining
REFERENCE = (0.07, 1 - 0.0182)
REFERENCE_LABEL = "L-OBS paper: 7 % left, 1.82 % error after retraining (recalled, unverified)"


def _per_layer(run_dir: str) -> dict[str, float]:
    """The prune record's per-layer reconstruction errors of one run."""
    record = json.loads((Path(run_dir) / "metrics.json").read_text())
    prunes = [h for h in record.get("history") or [] if h.get("phase") == "prune"]
    return {f"recon_error_{k}": v for k, v in (prunes[-1].get("reconstruction_error") or {}).items()
            } if prunes else {}


def points(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, stage): method, remaining fraction, test accuracy; the dense runs give
    remaining 1.0 for every method and stage."""
    done = runs[runs["status"] == "done"]
    lobs = done[done["method"] == "lobs"]
    rows = []
    for r in lobs.itertuples():
        label = METHOD_NAMES.get(r.pruner, r.pruner)
        if r.pruner_variant:
            label += f" ({r.pruner_variant})"
        base = {"dataset": r.dataset, "model": r.model, "variant": r.variant, "pruner": r.pruner,
                "method": label, "sparsity_target": r.sparsity_target, "seed": r.seed,
                "remaining": 1.0 - float(r.sparsity), "prune_seconds":
                getattr(r, "prune_seconds", float("nan")), **_per_layer(r.run_dir)}
        rows.append(base | {"stage": "pruned", "test_acc": getattr(r, "test_acc_pruned", None)})
        rows.append(base | {"stage": "finetuned", "test_acc": r.test_acc})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    dense = done[(done["method"] == "none") & (done["sparsity"] == 0)]
    extra = []
    for d in dense.itertuples():
        for (dataset, model, variant, pruner, method), _ in frame.groupby(
                ["dataset", "model", "variant", "pruner", "method"]):
            if (dataset, model) == (d.dataset, d.model):
                extra += [{"dataset": dataset, "model": model, "variant": variant,
                           "pruner": pruner, "method": method, "sparsity_target": 0.0,
                           "seed": d.seed, "remaining": 1.0, "stage": stage,
                           "test_acc": d.test_acc} for stage in STAGES]
    return pd.concat([frame, pd.DataFrame(extra)], ignore_index=True)


def summary(pts: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n over seeds per (dataset, model, variant, method, stage, target)."""
    keys = ["dataset", "model", "variant", "pruner", "method", "stage", "sparsity_target"]
    numeric = [c for c in pts.columns if c.startswith("recon_error_")] + ["prune_seconds"]
    numeric = [c for c in numeric if c in pts]
    agg = pts.groupby(keys, dropna=False).agg(
        remaining=("remaining", "mean"), test_acc=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"), n=("test_acc", "count"),
        **{c: (c, "mean") for c in numeric}).reset_index()
    agg["order"] = agg["pruner"].map({p: i for i, p in enumerate(ORDER)}).fillna(len(ORDER))
    agg = agg.sort_values(["dataset", "model", "variant", "order", "method", "stage",
                           "sparsity_target"], ascending=[True, True, True, True, True, False, True])
    return agg.drop(columns="order").reset_index(drop=True)


def figure(summ: pd.DataFrame, title: str) -> Figure:
    """Two panels, a linear axis running 1 -> 0 as in paper 001 and a log axis for the sparse
    end; solid lines without fine-tuning, dashed after it; the reference point marked."""
    fig = Figure(figsize=(13, 5.2))
    axes = fig.subplots(1, 2)
    for ax, log in zip(axes, (False, True), strict=True):
        for (pruner, method), g in summ.groupby(["pruner", "method"], sort=False):
            colour = COLOURS.get(pruner)
            for stage, style in (("pruned", "-"), ("finetuned", "--")):
                s = g[g["stage"] == stage].sort_values("remaining")
                ax.errorbar(s["remaining"], s["test_acc"], yerr=s["test_acc_std"].fillna(0),
                            fmt=style + "o", ms=3, capsize=2, color=colour, alpha=0.9,
                            label=f"{method}, {STAGES[stage]}")
        ax.plot(*REFERENCE, marker="*", ms=14, color="black", ls="none", label=REFERENCE_LABEL)
        ax.set_xlabel("remaining fraction of prunable weights")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            ticks = [1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.invert_xaxis()
            ax.set_title(f"{title}: sparse end (log axis)")
        else:
            ax.set_xlim(1.02, -0.02)
            ax.set_title(f"{title} (axis as in paper 001)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig


def table(summ: pd.DataFrame) -> pd.DataFrame:
    """Accuracy by method and stage (rows) and remaining fraction (columns): `mean ± std (n)`
    over seeds, or the single value when every cell has one seed."""
    one = bool((summ["n"] <= 1).all())

    def cell(r: pd.Series) -> str:
        if one or pd.isna(r["test_acc_std"]):
            return f"{r['test_acc']:.4f}"
        return f"{r['test_acc']:.4f} ± {r['test_acc_std']:.4f}"

    cells = summ.assign(cell=summ.apply(cell, axis=1), stage=summ["stage"].map(STAGES))
    wide = cells.pivot_table(index=["method", "stage"], columns="remaining", values="cell",
                             aggfunc="first", sort=False)
    wide = wide[sorted(wide.columns, reverse=True)]
    wide.columns = [f"{c:.3g}" for c in wide.columns]
    return wide.reset_index().fillna("–")


def to_latex(wide: pd.DataFrame) -> str:
    cols = list(wide.columns[2:])
    lines = [r"\begin{tabular}{ll" + "c" * len(cols) + "}", r"\toprule",
             " & ".join(["Method", "Stage", *cols]) + r" \\", r"\midrule"]
    for row in wide.itertuples(index=False):
        cells = [str(v).replace("±", r"$\pm$") for v in row[2:]]
        lines.append(" & ".join([row[0].replace("%", r"\%"), row[1], *cells]) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def write(runs_dir: Path, out: Path) -> list[Path]:
    col = collect(runs_dir, exclude=[out])
    pts = points(col.runs)
    if pts.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(pts)
    written = []
    for (dataset, model, variant), s in summ.groupby(["dataset", "model", "variant"], sort=False):
        stem = "lobs" + (f"_{dataset}_{model}" if summ[["dataset", "model"]].drop_duplicates()
                         .shape[0] > 1 else "") + (f"_{variant}" if variant else "")
        fig = figure(s, f"{dataset} x {model}" + (f" ({variant})" if variant else ""))
        written += save_figure(fig, out, stem)
        wide = table(s)
        (out / f"{stem}.md").write_text(wide.to_markdown(index=False, disable_numparse=True) + "\n")
        (out / f"{stem}.tex").write_text(to_latex(wide))
        written += [out / f"{stem}.md", out / f"{stem}.tex"]
    summ.to_csv(out / "lobs.csv", index=False)
    return [*written, out / "lobs.csv"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.lobs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS_DIR/analysis_lobs")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: runs directory {args.runs_dir} does not exist", file=sys.stderr)
        return 2
    out = args.out or args.runs_dir / "analysis_lobs"
    written = write(args.runs_dir, out)
    if not written:
        print(f"error: no finished lobs runs under {args.runs_dir}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    md = [p for p in written if p.suffix == ".md"]
    for p in md:
        print(p.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
