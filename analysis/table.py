"""Table 1: final test accuracy per (dataset, model, variant, target sparsity) and pruner column.

Only `status == "done"` runs count. Each cell holds the mean and the sample standard deviation
(ddof=1; NaN for a single seed) of the final test accuracy over seeds, the run count `n`, the mean
realised sparsity (percent of prunable weights), the paper's value and `diff = mean - paper`.
Runs whose final accuracy is NaN are left out of the cell (and listed by `collect` as problems).
Rows are told apart by `variant` (settings outside the pruner, e.g. `lr=0.01`), columns by the
pruner and its `pruner_variant` (e.g. "Bayes Magnitude (gate=tentative)"); see `collect`.

`table1` returns a wide frame: index (dataset, model, variant, sparsity), columns (column, stat)
with stat in `STATS`. `tidy` turns it into the CSV layout: one row per index and column.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import pandas as pd

STATS = ["mean", "std", "n", "realised_sparsity", "paper", "diff"]
LABELS = {"none": "Unpruned", "random": "Random", "bayes_random": "Bayes Random",
          "magnitude": "Magnitude", "bayes_magnitude": "Bayes Magnitude"}
PAPER_COLUMN = {label: name if name != "none" else "unpruned" for name, label in LABELS.items()}
DATASET_ORDER = ["mnist", "fashion_mnist", "cifar10"]
MODEL_ORDER = ["fcn", "cnn"]
MISSING = "—"


def load_paper() -> pd.DataFrame:
    """The paper's Table 1 as packaged in `analysis/data/paper_table1.csv`."""
    with resources.files("analysis").joinpath("data/paper_table1.csv").open() as f:
        paper = pd.read_csv(f)
    paper["sparsity"] = paper["sparsity"].astype(float)
    return paper


def ordered(values, order: list[str]) -> list[str]:
    """`values` sorted with the names in `order` first, in that order, then the rest by name."""
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def base_label(pruner: str) -> str:
    return LABELS.get(pruner, pruner)


def label_runs(runs: pd.DataFrame, variant: str | None = None) -> pd.DataFrame:
    """Done runs (of one row `variant`, or all when None) with their table `column`: the pruner's
    label, with its `pruner_variant` in parentheses when it has one."""
    done = runs[runs["status"] == "done"]
    if variant is not None:
        done = done[done["variant"] == variant]
    out = done.copy()
    out["column"] = [base_label(p) + (f" ({pv})" if pv else "")
                     for p, pv in zip(out["pruner"], out["pruner_variant"], strict=True)]
    return out.reset_index(drop=True)


def column_order(labels) -> list[str]:
    """Table columns: the five paper columns (when any paper-000 pruner is present), each followed
    by its variants, then the other pruners' columns, each followed by its variants."""
    labels = set(labels)
    bases = {lab.split(" (")[0] for lab in labels}
    paper_cols = list(LABELS.values()) if bases & set(LABELS.values()) else []
    cols = []
    for base in paper_cols + sorted(bases - set(paper_cols)):
        cols += [base] + sorted(lab for lab in labels if lab.startswith(base + " ("))
    return cols


def table1(runs: pd.DataFrame, paper: pd.DataFrame | None = None,
           variant: str | None = None) -> pd.DataFrame:
    """Wide Table 1 (see module doc). `paper=None` uses the packaged paper table; pass an empty
    DataFrame to leave the paper columns empty. `variant` keeps one row variant only."""
    paper = load_paper() if paper is None else paper
    runs = label_runs(runs, variant)
    columns = column_order(runs["column"])
    paper_lookup = {}
    if len(paper):
        for r in paper.to_dict("records"):
            for label in columns:
                key = PAPER_COLUMN.get(label.split(" (")[0])
                if key in r:
                    paper_lookup[(r["dataset"], r["model"], float(r["sparsity"]), label)] = r[key]

    records = []
    for dataset in ordered(runs["dataset"], DATASET_ORDER):
        for model in ordered(runs.loc[runs["dataset"] == dataset, "model"], MODEL_ORDER):
            dm = runs[(runs["dataset"] == dataset) & (runs["model"] == model)]
            for var in sorted(set(dm["variant"])):
                dv = dm[dm["variant"] == var]
                pruned = dv[dv["pruner"] != "none"]
                sparsities = sorted(pruned["sparsity_target"].unique()) or [0.0]
                for s in sparsities:
                    rec: dict = {"dataset": dataset, "model": model, "variant": var,
                                 "sparsity": float(s)}
                    for col in columns:
                        cell = dv[dv["column"] == col]
                        if col != "Unpruned":
                            cell = cell[cell["sparsity_target"] == s]
                        rec |= {(col, k): v for k, v in _cell(cell).items()}
                        ref = paper_lookup.get((dataset, model, float(s), col), math.nan)
                        rec[(col, "paper")] = ref
                        rec[(col, "diff")] = rec[(col, "mean")] - ref
                    records.append(rec)

    index = ["dataset", "model", "variant", "sparsity"]
    wide = pd.DataFrame(records, columns=[*index, *[(c, s) for c in columns for s in STATS]])
    wide = wide.set_index(index)
    wide.columns = pd.MultiIndex.from_tuples(wide.columns, names=["column", "stat"])
    wide.attrs["variant"] = variant
    return wide


def _cell(cell: pd.DataFrame) -> dict[str, float]:
    # Runs without a finite final accuracy are not counted (collect lists them as problems).
    acc = pd.to_numeric(cell["test_acc"], errors="coerce")
    cell = cell[acc.notna()]
    acc = acc[acc.notna()]
    sp = pd.to_numeric(cell["sparsity"], errors="coerce")
    n = len(cell)
    return {"mean": acc.mean() if n else math.nan,
            "std": acc.std(ddof=1) if n > 1 else math.nan,
            "n": n,
            "realised_sparsity": 100 * sp.mean() if n else math.nan}


def tidy(wide: pd.DataFrame) -> pd.DataFrame:
    """CSV layout: dataset, model, sparsity, column, then the `STATS` columns."""
    rows = []
    for key, row in wide.iterrows():
        for col in wide.columns.get_level_values("column").unique():
            rows.append(dict(zip(wide.index.names, key, strict=True)) | {"column": col}
                        | {s: row[(col, s)] for s in STATS})
    out = pd.DataFrame(rows, columns=[*wide.index.names, "column", *STATS])
    return out.astype({"n": int})


def _f(x: float, digits: int = 4, sign: bool = False) -> str:
    return MISSING if pd.isna(x) else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_cell(c: pd.Series, pm: str = "±", delta: str = "Δ") -> str:
    """`0.9781 ± 0.0012 (n=5, 90.0%) [paper 0.9772, Δ +0.0009]`; `—` for a missing cell."""
    if c["n"] == 0:
        ours = MISSING
    else:
        std = "" if pd.isna(c["std"]) else f" {pm} {_f(c['std'])}"
        sp = "" if pd.isna(c["realised_sparsity"]) else f", {c['realised_sparsity']:.1f}%"
        ours = f"{_f(c['mean'])}{std} (n={int(c['n'])}{sp})"
    if pd.isna(c["paper"]):
        return ours
    ref = f"paper {_f(c['paper'])}"
    if not pd.isna(c["diff"]):
        ref += f", {delta} {_f(c['diff'], sign=True)}"
    return f"{ours} [{ref}]"


def formatted(wide: pd.DataFrame, pm: str = "±", delta: str = "Δ") -> pd.DataFrame:
    """One string per cell, index levels as leading columns (for Markdown and HTML)."""
    out = wide.index.to_frame(index=False)
    out["sparsity"] = out["sparsity"].map(lambda s: f"{s:g}")
    if (out["variant"] == "").all():
        out = out.drop(columns="variant")
    for col in wide.columns.get_level_values("column").unique():
        out[col] = [format_cell(r, pm, delta) for _, r in wide[col].iterrows()]
    return out


def to_markdown(wide: pd.DataFrame) -> str:
    if not len(wide):
        return "_No finished runs._\n"
    head = (f"Final test accuracy: mean ± sample std (ddof=1) over seeds (n runs, mean realised "
            f"sparsity) [paper value, Δ = ours − paper]. {MISSING} = no finished runs.")
    if wide.attrs.get("variant"):
        head += f" Variant: `{wide.attrs['variant']}`."
    return head + "\n\n" + formatted(wide).to_markdown(index=False, disable_numparse=True) + "\n"


def _tex_escape(s: str) -> str:
    return s.replace("_", r"\_").replace("%", r"\%")


def to_latex(wide: pd.DataFrame) -> str:
    """A booktabs tabular: `mean ± std` with the paper value below in parentheses."""
    cols = list(wide.columns.get_level_values("column").unique())
    lines = [r"\begin{tabular}{llll" + "c" * len(cols) + "}", r"\toprule",
             " & ".join(["Dataset", "Model", "Variant", "Sparsity (\\%)", *map(_tex_escape, cols)])
             + r" \\", r"\midrule"]
    for key, row in wide.iterrows():
        ours, refs = [], []
        for col in cols:
            c = row[col]
            if c["n"] == 0:
                ours.append("--")
            else:
                std = "" if pd.isna(c["std"]) else rf" \pm {_f(c['std'])}"
                ours.append(f"${_f(c['mean'])}{std}$")
            refs.append("" if pd.isna(c["paper"]) else f"({_f(c['paper'])})")
        dataset, model, variant, s = key
        lines.append(" & ".join([_tex_escape(dataset), _tex_escape(model), _tex_escape(variant),
                                 f"{s:g}", *ours]) + r" \\")
        if any(refs):
            lines.append(" & ".join(["", "", "", "", *refs]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table1(wide: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write `table1.md`, `table1.tex` and the tidy `table1.csv`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table1.md", out / "table1.tex", out / "table1.csv"]
    paths[0].write_text(to_markdown(wide))
    paths[1].write_text(to_latex(wide))
    tidy(wide).to_csv(paths[2], index=False)
    return paths
