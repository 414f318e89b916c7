"""`python -m analysis.bmrs RUNS_DIR [--out DIR]`: paper 002 (BMRS) Table 1 and Fig. 2 from runs.

Table 1 (`bmrs_table1.md|.tex|.csv`): per dataset, model and pruner of the BMRS family, the
parameter compression % (the authors' "true parameter compression", `final.param_compression`)
and the test accuracy %, mean ± sample std (ddof=1; the authors' table uses ddof=0) over seeds, n,
the paper's values (`analysis/data/bmrs_table1.csv`, headline_numbers.md §2.1) and ours − paper.
`bmrs_structure.md|.csv` adds what the cut networks are: units removed, parameters physically
removed, remaining multiply-accumulates and widths.

Fig. 2 (`figures/bmrs_fig2_<dataset>_<model>.png|.pdf`, and all blocks in `bmrs_fig2.png|.pdf`):
from `bmrs_post` runs, test accuracy against parameter compression after post-training pruning
with one fine-tuning epoch per point, mean over seeds at each pruning percentile with a ±1 std
band; the BMRS curves end where their ΔF >= 0 set runs out, each seed's stopping point drawn as a
marker and their mean as a large one.

Runs are read with `analysis.collect` (only `done` runs count; problems are listed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .collect import collect, find_metrics

ROWS = {"bmrs_none": "None", "l2": "L2", "e_theta": "E[θ]", "snr": "SNR", "bmrs_n": "BMRS_N",
        "bmrs_n_exact": "BMRS_N (exact ΔF)", "bmrs_u8": "BMRS_U-8", "bmrs_u4": "BMRS_U-4"}
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
            "synthetic": "synthetic"}
MODELS = {"bmrs_mlp": "MLP", "lenet5": "LeNet5"}
CRITERIA = {"snr": "SNR", "l2": "L2", "e_theta": "E[θ]", "bmrs_n": "BMRS_N", "bmrs_n_exact": "BMRS_N exact",
            "bmrs_u8": "BMRS_U-8", "bmrs_u4": "BMRS_U-4"}
COLOURS = {"snr": "tab:blue", "l2": "tab:orange", "e_theta": "tab:brown", "bmrs_n": "tab:green",
           "bmrs_n_exact": "tab:olive", "bmrs_u8": "tab:red", "bmrs_u4": "tab:purple"}
MARKERS = {"bmrs_n": "o", "bmrs_n_exact": "P", "bmrs_u8": "s", "bmrs_u4": "*"}
METRICS = ("comp", "acc")


def load_paper() -> pd.DataFrame:
    with resources.files("analysis").joinpath("data/bmrs_table1.csv").open() as f:
        return pd.read_csv(f)


def ordered(values, order) -> list[str]:
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def table1(runs: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (dataset, model, variant, pruner): comp/acc mean, std, n, paper, diff (in %)."""
    paper = load_paper() if paper is None else paper
    ref = {(r.dataset, r.model, r.pruner): r for r in paper.itertuples()}
    done = runs[(runs["status"] == "done") & runs["pruner"].isin(list(ROWS))]
    records = []
    for dataset in ordered(done["dataset"], DATASETS):
        for model in ordered(done.loc[done["dataset"] == dataset, "model"], MODELS):
            block = done[(done["dataset"] == dataset) & (done["model"] == model)]
            for variant in sorted(set(block["variant"])):
                for pruner in ordered(block.loc[block["variant"] == variant, "pruner"], ROWS):
                    cell = block[(block["variant"] == variant) & (block["pruner"] == pruner)]
                    comp = 100 * pd.to_numeric(cell.get("param_compression"), errors="coerce")
                    acc = 100 * pd.to_numeric(cell["test_acc"], errors="coerce")
                    p = ref.get((dataset, model, pruner))
                    rec = {"dataset": dataset, "model": model, "variant": variant, "pruner": pruner,
                           "n": int(acc.notna().sum())}
                    for name, values in (("comp", comp), ("acc", acc)):
                        values = values.dropna()
                        mean = values.mean() if len(values) else math.nan
                        rec[f"{name}_mean"] = mean
                        rec[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
                        rec[f"{name}_paper"] = getattr(p, f"{name}_mean") if p is not None else math.nan
                        rec[f"{name}_paper_std"] = getattr(p, f"{name}_std") if p is not None else math.nan
                        rec[f"{name}_diff"] = mean - rec[f"{name}_paper"]
                    records.append(rec)
    return pd.DataFrame(records)


def structure(runs: pd.DataFrame) -> pd.DataFrame:
    """What the final networks are: unit and parameter compression, MACs, cut widths (means)."""
    done = runs[(runs["status"] == "done") & runs["pruner"].isin(list(ROWS))]
    rows = []
    for (dataset, model, variant, pruner), cell in done.groupby(["dataset", "model", "variant", "pruner"]):
        widths = []
        for run_dir in cell["run_dir"]:
            final = json.loads((Path(run_dir) / "metrics.json").read_text())["final"]
            widths.append(list(final["units_remaining"].values()))
        rows.append({
            "dataset": dataset, "model": model, "variant": variant, "pruner": pruner, "n": len(cell),
            "units_removed_pct": 100 * pd.to_numeric(cell["unit_compression"], errors="coerce").mean(),
            "param_compression_pct": 100 * pd.to_numeric(cell["param_compression"], errors="coerce").mean(),
            "params_removed_pct": 100 * pd.to_numeric(cell["params_removed"], errors="coerce").mean(),
            "params_dense": int(cell["params_dense"].iloc[0]),
            "params_final": float(pd.to_numeric(cell["params_total"]).mean()),
            "macs_remaining_pct": 100 * (pd.to_numeric(cell["macs_nonzero"])
                                         / pd.to_numeric(cell["macs_dense"])).mean(),
            "widths_mean": "-".join(f"{w:.0f}" for w in np.mean(widths, axis=0)),
        })
    out = pd.DataFrame(rows)
    if len(out):
        out["_d"] = out["dataset"].map(list(DATASETS).index)
        out["_p"] = out["pruner"].map(list(ROWS).index)
        out = out.sort_values(["_d", "model", "variant", "_p"]).drop(columns=["_d", "_p"])
    return out


def _pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}")


def _cell(r, name: str) -> str:
    ours = _pm(r[f"{name}_mean"], r[f"{name}_std"])
    if pd.isna(r[f"{name}_paper"]):
        return ours
    return f"{ours} ({r[f'{name}_paper']:.2f}, Δ {r[f'{name}_diff']:+.2f})"


def to_markdown(t1: pd.DataFrame) -> str:
    if not len(t1):
        return "_No finished BMRS runs._\n"
    lines = ["Parameter compression % (the authors' true parameter compression) and test accuracy %: "
             "ours as mean ± sample std over n seeds, then (paper, Δ = ours − paper).", ""]
    for (dataset, model, variant), block in t1.groupby(["dataset", "model", "variant"], sort=False):
        title = f"**{DATASETS.get(dataset, dataset)} × {MODELS.get(model, model)}**"
        lines += [title + (f" ({variant})" if variant else ""), "",
                  "| Method | n | Comp. % | Acc. % |", "|---|---:|---|---|"]
        for r in block.to_dict("records"):
            lines.append(f"| {ROWS.get(r['pruner'], r['pruner'])} | {r['n']} | {_cell(r, 'comp')} | "
                         f"{_cell(r, 'acc')} |")
        lines.append("")
    return "\n".join(lines)


def to_latex(t1: pd.DataFrame) -> str:
    lines = [r"\begin{tabular}{lllrcccc}", r"\toprule",
             r"Dataset & Model & Method & $n$ & Comp.\ \% & paper & Acc.\ \% & paper \\", r"\midrule"]
    for r in t1.to_dict("records"):
        def tex(mean, std):
            if pd.isna(mean):
                return "--"
            return f"${mean:.2f}" + ("" if pd.isna(std) else rf" \pm {std:.2f}") + "$"
        name = ROWS.get(r["pruner"], r["pruner"]).replace("_N", r"$_\mathcal{N}$").replace(
            "_U", r"$_\mathcal{U}$").replace("E[θ]", r"E[$\theta$]").replace("ΔF", r"$\Delta F$")
        lines.append(" & ".join([DATASETS.get(r["dataset"], r["dataset"]), MODELS.get(r["model"], r["model"]),
                                 name, str(r["n"]), tex(r["comp_mean"], r["comp_std"]),
                                 tex(r["comp_paper"], r["comp_paper_std"]),
                                 tex(r["acc_mean"], r["acc_std"]),
                                 tex(r["acc_paper"], r["acc_paper_std"])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def structure_markdown(st: pd.DataFrame) -> str:
    if not len(st):
        return "_No finished BMRS runs._\n"
    show = st.copy()
    show["pruner"] = show["pruner"].map(lambda p: ROWS.get(p, p))
    for c in ("units_removed_pct", "param_compression_pct", "params_removed_pct", "macs_remaining_pct"):
        show[c] = show[c].map(lambda v: f"{v:.1f}")
    show["params_final"] = show["params_final"].map(lambda v: f"{v:.0f}")
    head = ("Final networks (means over seeds): units removed (noise units pruned), parameter "
            "compression as the authors count it, parameters physically removed by the cut "
            "(1 − final / dense, noise parameters included), remaining MACs per example, mean "
            "hidden widths after the cut.\n\n")
    return head + show.to_markdown(index=False) + "\n"


# -- Fig. 2 -------------------------------------------------------------------------------------------


def sweeps(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (post-training run, criterion, percentile) of the done `bmrs_post` runs."""
    rows = []
    post = runs[(runs["status"] == "done") & (runs["pruner"] == "bmrs_post")]
    for r in post.itertuples():
        history = json.loads((Path(r.run_dir) / "metrics.json").read_text())["history"]
        prune = next((h for h in history if h.get("phase") == "prune" and "sweep" in h), None)
        if prune is None:
            continue
        for i, p in enumerate(prune["sweep"]):
            rows.append({"dataset": r.dataset, "model": r.model, "variant": r.variant, "seed": r.seed,
                         "index": i, **p})
    return pd.DataFrame(rows)


def _curve(points: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds at each percentile; a BMRS curve only up to the percentile where
    the first seed stopped (beyond it the mean would mix stopped and running seeds)."""
    if points["stop"].any():
        first_stop = points[points["stop"]].groupby("seed")["percentile"].min().min()
        points = points[points["percentile"] <= first_stop]
    g = points.groupby("percentile")
    return pd.DataFrame({"comp": 100 * g["param_compression"].mean(), "acc": 100 * g["test_acc"].mean(),
                         "acc_std": 100 * g["test_acc"].std(ddof=1)}).reset_index()


def draw_block(ax, sw: pd.DataFrame, title: str) -> None:
    for criterion in ordered(sw["criterion"], CRITERIA):
        pts = sw[sw["criterion"] == criterion]
        curve = _curve(pts)
        colour = COLOURS.get(criterion, "black")
        ax.plot(curve["comp"], curve["acc"], color=colour, label=CRITERIA.get(criterion, criterion),
                lw=2 if criterion.startswith("bmrs") else 1.5)
        ax.fill_between(curve["comp"], curve["acc"] - curve["acc_std"].fillna(0),
                        curve["acc"] + curve["acc_std"].fillna(0), color=colour, alpha=0.15, lw=0)
        stops = pts[pts["stop"] & ~pts["repeat"]]
        if len(stops):
            marker = MARKERS.get(criterion, "o")
            ax.scatter(100 * stops["param_compression"], 100 * stops["test_acc"], color=colour,
                       marker=marker, s=18, alpha=0.6, lw=0)
            ax.scatter(100 * stops["param_compression"].mean(), 100 * stops["test_acc"].mean(),
                       color=colour, marker=marker, s=110, edgecolor="black", zorder=5)
    ax.set_title(title)
    ax.set_xlabel("parameter compression (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def fig2(sw: pd.DataFrame, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    from .figures import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not len(sw):
        return paths
    blocks = [(d, m, v) for d in ordered(sw["dataset"], DATASETS)
              for m in ordered(sw.loc[sw["dataset"] == d, "model"], MODELS)
              for v in sorted(set(sw.loc[(sw["dataset"] == d) & (sw["model"] == m), "variant"]))]

    def title(d, m, v):
        n = sw[(sw["dataset"] == d) & (sw["model"] == m) & (sw["variant"] == v)]["seed"].nunique()
        return f"{DATASETS.get(d, d)} × {MODELS.get(m, m)}" + (f" ({v})" if v else "") + f", {n} seeds"

    def save(fig, name):
        paths.extend(save_figure(fig, out_dir, name))

    for d, m, v in blocks:
        fig = Figure(figsize=(6, 4.5))
        ax = fig.subplots()
        draw_block(ax, sw[(sw["dataset"] == d) & (sw["model"] == m) & (sw["variant"] == v)], title(d, m, v))
        ax.legend(loc="lower left", fontsize=8)
        save(fig, f"bmrs_fig2_{d}_{m}" + (f"_{v}" if v else "").replace("=", "-").replace(",", "_"))
    fig = Figure(figsize=(5 * len(blocks), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(blocks)))
    for ax, (d, m, v) in zip(axes, blocks, strict=True):
        draw_block(ax, sw[(sw["dataset"] == d) & (sw["model"] == m) & (sw["variant"] == v)], title(d, m, v))
    axes[0].legend(loc="lower left", fontsize=8)
    save(fig, "bmrs_fig2")
    return paths


def stops_table(sw: pd.DataFrame) -> pd.DataFrame:
    """Where the BMRS criteria stop in post-training pruning: compression and accuracy there."""
    rows = []
    keys = ["dataset", "model", "variant", "criterion"]
    for (d, m, v, c), pts in sw[sw["stop"] & ~sw["repeat"]].groupby(keys):
        rows.append({"dataset": d, "model": m, "variant": v, "criterion": c, "n": len(pts),
                     "stop_param_compression_pct": 100 * pts["param_compression"].mean(),
                     "stop_units_pct": 100 * pts["unit_compression"].mean(),
                     "stop_acc_pct": 100 * pts["test_acc"].mean(),
                     "stop_acc_std": 100 * pts["test_acc"].std(ddof=1) if len(pts) > 1 else math.nan})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.bmrs",
                                     description="BMRS (paper 002) Table 1 and Fig. 2 from runs.")
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS_DIR/analysis_bmrs")
    args = parser.parse_args(argv)
    out = args.out or args.runs_dir / "analysis_bmrs"
    if not args.runs_dir.is_dir() or not find_metrics(args.runs_dir, exclude=[out]):
        print(f"error: no run directories under {args.runs_dir}", file=sys.stderr)
        return 2
    col = collect(args.runs_dir, exclude=[out])
    print(f"runs under {args.runs_dir}: " + ", ".join(f"{k} {v}" for k, v in col.status_counts().items()))
    for p in col.problems.itertuples():
        print(f"  problem [{p.status}] {p.run_dir}: {p.reason}")
    out.mkdir(parents=True, exist_ok=True)
    t1 = table1(col.runs)
    written = [out / "bmrs_table1.md", out / "bmrs_table1.tex", out / "bmrs_table1.csv",
               out / "bmrs_structure.md", out / "bmrs_structure.csv"]
    written[0].write_text(to_markdown(t1))
    written[1].write_text(to_latex(t1))
    t1.to_csv(written[2], index=False)
    st = structure(col.runs)
    written[3].write_text(structure_markdown(st))
    st.to_csv(written[4], index=False)
    sw = sweeps(col.runs)
    if len(sw):
        stops = stops_table(sw)
        written += [out / "bmrs_fig2_stops.csv", out / "bmrs_fig2_points.csv"]
        stops.to_csv(written[-2], index=False)
        sw.to_csv(written[-1], index=False)
        written += fig2(sw, out / "figures")
    for path in written:
        print(f"wrote {path}")
    print()
    print(to_markdown(t1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
