"""Paper 003 (self-compressing eVI CNN): Fig. 5, Figs. 2-4, the storage table and the zero-kernel
tables from the run directories of `pruner=self_compress`.

    python -m analysis.evi RUNS_DIR --out DIR

Every trained network is one row of `networks`: the first cycle of every run and each later cycle
of a loop (metrics.json `final.cycles`, which holds each network's kernel norms, so no
checkpoint is read). Settings that differ from the replication defaults (kl, covariance, restart,
batch size, lr, ...) make a `variant`; figures and tables show the default variant unless
`--variant` names another (every variant is listed in networks.csv).

    fig5_accuracy_vs_kernels.{png,pdf}   test accuracy against N, Bayesian against vanilla, per
                                         dataset (networks trained from scratch)
    fig2_kernel_norms_mnist_n100, fig3_kernel_norms_mnist, fig4_kernel_norms_fashion_mnist
                                         ||M_k||_F of every kernel, zero kernels marked
    zero_kernels.{md,tex,csv}            zero / dead kernels and accuracy per network, with the
                                         paper's values
    loops.{md,tex,csv}                   the iterative loop of every run, one row per cycle
    storage.{md,tex,csv}                 conv storage after compression, (d^2+1) N vs d^2 N floats
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .collect import collect, find_metrics
from .figures import save_figure

KIND = {"evi_cnn": "Bayesian eVI", "vanilla_cnn": "vanilla"}
COLOURS = {"Bayesian eVI": "tab:orange", "vanilla": "tab:blue"}  # as in the paper's Fig. 5
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# settings that name a variant when they differ from these (the replication defaults)
DEFAULTS = {"pruner.kl": "dera_tf1_l1", "pruner.tau": 0.002, "pruner.threshold": 1e-7,
            "pruner.restart": "scratch", "pruner.nll_eps": 0.001, "pruner.clip_sigma_y": True,
            "model.covariance": "full", "model.init": "tf1", "model.pixels": "unit",
            "model.kernel_size": 5, "model.pool": 2, "trainer.batch_size": 16,
            "trainer.lr": 0.0016, "trainer.epochs": 10, "dataset.train_subset": None}
# [S3] §3.1-§3.4 (methods.md §4.5): (dataset, N) -> (Bayes acc, vanilla acc, Bayes zero, vanilla zero)
PAPER = {("mnist", 100): (0.97, 0.97, 28, 2), ("mnist", 64): (0.97, 0.97, 11, 5),
         ("mnist", 25): (0.96, 0.94, 4, 0)}
PAPER_STORAGE = {"mnist": (32, 64, 3.25, 6.25), "fashion_mnist": (40, 72, 4.06, 7.03)}


def _flat(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def variant_of(config: dict) -> str:
    """The settings of a run that differ from the replication defaults, e.g. 'kl=exact_gauss'."""
    parts = []
    for key, default in DEFAULTS.items():
        value = _flat(config, key)
        if key == "model.covariance" and _flat(config, "model.name") != "evi_cnn":
            continue
        if value is not None and value != default:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float)
                         else f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(parts)


def networks(root: Path, exclude: list[Path]) -> pd.DataFrame:
    """One row per trained network of every done self_compress run under `root`."""
    col = collect(root, exclude=exclude)
    rows = []
    runs = col.runs
    if not len(runs):
        return pd.DataFrame()
    for _, run in runs[(runs["status"] == "done") & (runs["method"] == "self_compress")].iterrows():
        record = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
        config, final = record["config"], record["final"]
        restart = _flat(config, "pruner.restart")
        cycles = final.get("cycles") or [{"cycle": 1, "kernels": final["kernels"],
                                          "zero_kernels": final["zero_kernels"],
                                          "test_acc": final["test_acc"],
                                          "kernel_norms": final["kernel_norms"]}]
        for c in cycles:
            rows.append({
                "dataset": run["dataset"], "model": run["model"], "kind": KIND.get(run["model"]),
                "variant": variant_of(config), "seed": run["seed"], "cycle": c["cycle"],
                "trained_from": "scratch" if c["cycle"] == 1 else restart,
                "kernels": c["kernels"], "zero_kernels": c["zero_kernels"],
                "dead_kernels": c.get("dead_kernels"), "test_acc": c["test_acc"],
                "test_acc_removed": c.get("test_acc_removed", c["test_acc"]),
                "sigma2_zero_mean": c.get("sigma2_zero_mean"),
                "sigma2_nonzero_mean": c.get("sigma2_nonzero_mean"),
                "min_norm": min(c["kernel_norms"]), "kernel_norms": c["kernel_norms"],
                "dead_kernel_ids": c.get("dead_kernel_ids"),
                "threshold": _flat(config, "pruner.threshold"),
                "final_kernels": final["kernels"], "final_test_acc": final["test_acc"],
                "max_cycles": _flat(config, "pruner.cycles"),
                "kernels_initial": cycles[0]["kernels"],
                "cycles_run": len(cycles), "run_dir": run["run_dir"],
            })
    return pd.DataFrame(rows)


# -- output helpers ------------------------------------------------------------------------------


def _tex(s: str) -> str:
    return str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def write_table(df: pd.DataFrame, out: Path, name: str, caption: str) -> list[Path]:
    """Markdown, LaTeX and CSV of one table."""
    shown = df.astype(object).where(df.notna(), "")
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
    (out / f"{name}.md").write_text(f"{caption}\n\n" + "\n".join(lines) + "\n")
    tex = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex(caption)}}}",
           r"\begin{tabular}{" + "l" * len(df.columns) + "}", r"\hline",
           " & ".join(_tex(c) for c in df.columns) + r" \\", r"\hline"]
    tex += [" & ".join(_tex(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    tex += [r"\hline", r"\end{tabular}", r"\end{table}"]
    (out / f"{name}.tex").write_text("\n".join(tex) + "\n")
    df.to_csv(out / f"{name}.csv", index=False)
    return [out / f"{name}.{ext}" for ext in ("md", "tex", "csv")]


def _acc(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


# -- figures -------------------------------------------------------------------------------------


def fig5(nets: pd.DataFrame, out: Path) -> list[Path]:
    """Test accuracy against N (networks trained from scratch), Bayesian against vanilla."""
    data = nets[nets["trained_from"] == "scratch"]
    datasets = [d for d in DATASETS if d in set(data["dataset"])] or sorted(set(data["dataset"]))
    fig = Figure(figsize=(5.2 * max(1, len(datasets)), 4))
    for i, ds in enumerate(datasets or ["none"]):
        ax = fig.add_subplot(1, max(1, len(datasets)), i + 1)
        sub = data[data["dataset"] == ds]
        for kind, colour in COLOURS.items():
            pts = sub[sub["kind"] == kind].groupby("kernels")["test_acc"].agg(["mean", "std", "count"])
            if len(pts):
                ax.errorbar(pts.index, 100 * pts["mean"], yerr=100 * pts["std"].fillna(0),
                            marker="o", color=colour, label=kind, capsize=3)
        for (pds, n), (acc_b, acc_v, _, _) in PAPER.items():
            if pds == ds:
                ax.scatter([n, n], [100 * acc_b, 100 * acc_v], marker="x", s=40,
                           color=[COLOURS["Bayesian eVI"], COLOURS["vanilla"]],
                           label="paper (text)" if n == 100 else None)
        ax.set_xlabel("number of kernels N")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"({'ab'[i] if i < 2 else i}) {DATASETS.get(ds, ds)}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return save_figure(fig, out, "fig5_accuracy_vs_kernels")


def _norm_panel(ax, row: pd.Series) -> None:
    norms = row["kernel_norms"]
    thr = row["threshold"] or 1e-7
    floor = 1e-12
    xs = list(range(1, len(norms) + 1))
    zero = [n <= thr for n in norms]
    dead = set(row.get("dead_kernel_ids") or [])
    colours = ["tab:red" if z else "tab:purple" if i in dead else "tab:gray"
               for i, z in enumerate(zero)]
    ax.bar(xs, [max(n, floor) for n in norms], color=colours, width=0.8)
    handles = [Line2D([], [], color="tab:red", lw=0.8, ls="--",
                      label=f"zero kernel: norm <= {thr:g}")]
    if any(zero):
        handles.append(Patch(color="tab:red", label="zero kernel"))
    if dead - {i for i, z in enumerate(zero) if z}:
        handles.append(Patch(color="tab:purple", label="dead (never active), not zero"))
    if any(n < floor for n in norms):  # exact zeros have no place on a log axis: a visible stub
        handles.append(Patch(color="none", label=f"norm < {floor:g} (e.g. 0) drawn at {floor:g}"))
    ax.axhline(thr, color="tab:red", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylim(floor / 100, max(max(norms) * 3, 1))
    ax.set_xlabel("kernel")
    ax.set_ylabel("Frobenius norm")
    ax.set_title(f"{row['kind']}, N = {row['kernels']}: {sum(zero)} zero kernels, "
                 f"acc {100 * row['test_acc']:.2f} %", fontsize=9)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def fig_norms(nets: pd.DataFrame, out: Path) -> list[Path]:
    """Figs. 2-4: the norms of every kernel of the networks of the paper's N, one row per N."""
    first = nets[nets["trained_from"] == "scratch"].sort_values("cycle").drop_duplicates(
        ["dataset", "kind", "kernels"])
    paths: list[Path] = []
    specs = [("fig2_kernel_norms_mnist_n100", "mnist", [100]),
             ("fig3_kernel_norms_mnist", "mnist", None),
             ("fig4_kernel_norms_fashion_mnist", "fashion_mnist", None)]
    for name, ds, ns in specs:
        sub = first[first["dataset"] == ds]
        if name == "fig3_kernel_norms_mnist":
            ns = sorted(set(sub["kernels"]) - {100}, reverse=True)
        elif ns is None:
            ns = sorted(set(sub["kernels"]), reverse=True)
        ns = [n for n in ns if n in set(sub["kernels"])]
        if not ns:
            continue
        fig = Figure(figsize=(15, 2.8 * len(ns)))
        for r, n in enumerate(ns):
            for c, kind in enumerate(COLOURS):
                ax = fig.add_subplot(len(ns), 2, 2 * r + c + 1)
                row = sub[(sub["kernels"] == n) & (sub["kind"] == kind)]
                if len(row):
                    _norm_panel(ax, row.iloc[0])
                else:
                    ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes)
                    ax.set_title(f"{kind}, N = {n}", fontsize=9)
        paths += save_figure(fig, out, name)
    return paths


# -- tables --------------------------------------------------------------------------------------


def zero_kernel_table(nets: pd.DataFrame) -> pd.DataFrame:
    first = nets[nets["trained_from"] == "scratch"]
    rows = []
    for (ds, n), grp in first.groupby(["dataset", "kernels"], sort=False):
        paper = PAPER.get((ds, n))
        for kind, sub in grp.groupby("kind"):
            r = sub.iloc[0]
            i = 0 if kind == "Bayesian eVI" else 1
            rows.append({
                "dataset": DATASETS.get(ds, ds), "N": n, "model": kind,
                "zero kernels": int(sub["zero_kernels"].mean()),
                "dead kernels": "" if pd.isna(r["dead_kernels"]) else int(sub["dead_kernels"].mean()),
                "min kernel norm": f"{sub['min_norm'].min():.2e}",
                "test acc": _acc(sub["test_acc"].mean()),
                "acc without zero kernels": _acc(sub["test_acc_removed"].mean()),
                "mean sigma^2 zero / other": (
                    "" if kind != "Bayesian eVI" else
                    f"{r['sigma2_zero_mean']:.4f} / {r['sigma2_nonzero_mean']:.4f}"
                    if pd.notna(r["sigma2_zero_mean"]) else f"- / {r['sigma2_nonzero_mean']:.4f}"),
                "paper: zero kernels": "" if paper is None else paper[2 + i],
                "paper: acc": "" if paper is None else _acc(paper[i]),
            })
    df = pd.DataFrame(rows)
    if len(df):
        df["_d"] = df["dataset"].map({v: i for i, v in enumerate(DATASETS.values())})
        df = df.sort_values(["_d", "N", "model"], ascending=[True, False, True]).drop(columns="_d")
    return df


def loop_table(nets: pd.DataFrame) -> pd.DataFrame:
    loops = nets[nets["cycles_run"] > 1]
    rows = [{"dataset": DATASETS.get(r.dataset, r.dataset), "model": r.kind, "variant": r.variant,
             "cycle": r.cycle, "trained from": r.trained_from, "N": r.kernels,
             "zero kernels": r.zero_kernels, "dead kernels": r.dead_kernels,
             "test acc": _acc(r.test_acc), "acc without zero kernels": _acc(r.test_acc_removed),
             "final N": r.final_kernels, "final acc": _acc(r.final_test_acc)}
            for r in loops.sort_values(["dataset", "model", "variant", "cycle"]).itertuples()]
    return pd.DataFrame(rows)


def storage_table(nets: pd.DataFrame, d: int = 5) -> pd.DataFrame:
    """Conv storage after compression: the Bayesian loop's final N against the fewest vanilla
    kernels reaching the same accuracy (paper §3.4), (d^2+1) N vs d^2 N float32."""
    rows = []
    for ds in [x for x in DATASETS if x in set(nets["dataset"])]:
        sub = nets[nets["dataset"] == ds]
        bayes = sub[sub["kind"] == "Bayesian eVI"]
        if not len(bayes):
            continue
        # the loop experiment's run: allowed several cycles, started from the most kernels
        loop = bayes.sort_values(["max_cycles", "kernels_initial"], ascending=False).iloc[0]
        n_b, acc_b = int(loop["final_kernels"]), float(loop["final_test_acc"])
        vanilla = sub[(sub["kind"] == "vanilla") & (sub["trained_from"] == "scratch")]
        reach = vanilla[vanilla["test_acc"] >= acc_b]
        n_v = int(reach["kernels"].min()) if len(reach) else None
        acc_v = float(reach.loc[reach["kernels"].idxmin(), "test_acc"]) if len(reach) else None
        paper = PAPER_STORAGE.get(ds)
        rows.append({
            "dataset": DATASETS[ds], "Bayesian N (loop's end)": n_b, "Bayesian acc": _acc(acc_b),
            "Bayesian floats (d^2+1)N": (d * d + 1) * n_b,
            "Bayesian KB": f"{(d * d + 1) * n_b * 4 / 1024:.2f}",
            "vanilla N at that acc": "" if n_v is None else n_v, "vanilla acc": _acc(acc_v),
            "vanilla floats d^2 N": "" if n_v is None else d * d * n_v,
            "vanilla KB": "" if n_v is None else f"{d * d * n_v * 4 / 1024:.2f}",
            "paper N (Bayes / vanilla)": "" if paper is None else f"{paper[0]} / {paper[1]}",
            "paper KB (Bayes / vanilla)": "" if paper is None else f"{paper[2]} / {paper[3]}",
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.evi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS_DIR/analysis_evi")
    parser.add_argument("--variant", default="", help='settings variant shown ("" = defaults)')
    args = parser.parse_args(argv)
    out = args.out or args.runs_dir / "analysis_evi"
    if not args.runs_dir.is_dir() or not find_metrics(args.runs_dir, exclude=[out]):
        print(f"error: no run directories under {args.runs_dir}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    every = networks(args.runs_dir, [out])
    if not len(every):
        print(f"error: no finished self_compress runs under {args.runs_dir}", file=sys.stderr)
        return 2
    every.drop(columns=["kernel_norms", "dead_kernel_ids"]).to_csv(out / "networks.csv", index=False)
    nets = every[every["variant"] == args.variant]
    print(f"{len(every)} trained networks; variants: "
          f"{sorted(set(every['variant']), key=len)} (shown: {args.variant or 'defaults'!r})")
    written = [out / "networks.csv"]
    written += fig5(nets, out) + fig_norms(nets, out)
    zk = zero_kernel_table(nets)
    written += write_table(zk, out, "zero_kernels",
                           "Zero kernels (Frobenius norm of the posterior mean <= 1e-7), dead "
                           "kernels (no positive pre-activation on the training set) and test "
                           "accuracy of every network trained from scratch")
    written += write_table(loop_table(every), out, "loops",
                           "The iterative loop: one row per cycle (every variant)")
    st = storage_table(nets)
    written += write_table(st, out, "storage", "Conv-layer storage after compression (float32, "
                           "KB = 1024 B)")
    for title, df in (("zero kernels", zk), ("storage", st)):
        print(f"\n{title}:\n{df.to_string(index=False) if len(df) else '(none)'}")
    print("\nwrote " + ", ".join(p.name for p in written) + f" to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
