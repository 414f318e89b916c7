"""Figures: learning curves, accuracy vs epoch and accuracy vs sparsity, as PNG (dpi 150) and PDF.

Figures are built on `matplotlib.figure.Figure` directly, so no GUI backend or pyplot state is
involved (PNG goes through Agg). Lines are means over seeds with a ±1 std band; only done runs of
one row variant are drawn per figure (see `table.label_runs`), and every variant present gets its
own figures (file names end in the variant). Curves are drawn over the train phase's epochs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .table import (
    DATASET_ORDER,
    MODEL_ORDER,
    PAPER_COLUMN,
    column_order,
    label_runs,
    load_paper,
    ordered,
)

COLOURS = {"Unpruned": "black", "Random": "tab:blue", "Bayes Random": "tab:orange",
           "Magnitude": "tab:green", "Bayes Magnitude": "tab:red",
           "Random (gate=tentative)": "tab:cyan", "Bayes Random (gate=tentative)": "tab:brown",
           "Bayes Magnitude (gate=tentative)": "tab:purple"}
DPI = 150


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.=]+", "_", text.lower()).strip("_").replace(".", "p")


def _pct(s: float) -> str:
    return f"{s:g}"


def _palette(labels) -> dict[str, str]:
    extra = iter(sns.color_palette("Set2", 8).as_hex())
    return {lab: COLOURS.get(lab) or next(extra) for lab in labels}


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Every figure of `analysis` goes out this way: PNG and PDF, the paths returned."""
    fig.tight_layout()
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=DPI)
    fig.savefig(paths[1])
    return paths


def _name(stem: str, variant: str) -> str:
    return f"{stem}_{slug(variant)}" if variant else stem


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def train_history(history: pd.DataFrame) -> pd.DataFrame:
    """The train-phase epochs (all records of schema-1 runs, which had no phases)."""
    if "phase" not in history:
        return history
    return history[history["phase"].isna() | (history["phase"] == "train")]


def _keys(runs: pd.DataFrame):
    for dataset in ordered(runs["dataset"], DATASET_ORDER):
        d = runs[runs["dataset"] == dataset]
        for model in ordered(d["model"], MODEL_ORDER):
            yield dataset, model, d[d["model"] == model]


def learning_curves(runs: pd.DataFrame, history: pd.DataFrame, dataset: str, model: str,
                    sparsity: float, out_dir: str | Path, variant: str = "") -> list[Path]:
    """Loss (train dashed, test solid), log Bayes factor and realised sparsity vs epoch per pruner
    at one target sparsity; the Unpruned run of the same (dataset, model) is drawn too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lab = label_runs(runs, variant)
    lab = lab[(lab["dataset"] == dataset) & (lab["model"] == model)
              & ((lab["sparsity_target"] == sparsity) | (lab["column"] == "Unpruned"))]
    h = train_history(history).merge(lab[["run_dir", "column"]], on="run_dir")
    hue_order = [c for c in column_order(lab["column"]) if c in set(lab["column"])]
    palette = _palette(hue_order)

    fig = Figure(figsize=(15, 4.2))
    ax_loss, ax_bf, ax_sp = fig.subplots(1, 3)
    loss = h.melt(id_vars=["run_dir", "epoch", "column"], value_vars=["train_loss", "test_loss"],
                  var_name="split", value_name="loss").dropna(subset=["loss"])
    loss["split"] = loss["split"].str.removesuffix("_loss")
    panels = [(ax_loss, loss, "loss", "Loss (train dashed, test solid)"),
              (ax_bf, h.assign(log_bf=pd.to_numeric(h["log_bf"]) if "log_bf" in h else float("nan"))
               .dropna(subset=["log_bf"]),
               "log_bf", "log Bayes factor"),
              (ax_sp, h.assign(sparsity=100 * pd.to_numeric(h["sparsity"])), "sparsity",
               "Realised sparsity (%)")]
    for ax, data, y, title in panels:
        ax.set_title(title)
        if not len(data):
            _empty(ax)
            continue
        kw = {"style": "split", "style_order": ["train", "test"],
              "dashes": {"train": (4, 2), "test": ""}} if y == "loss" else {}
        sns.lineplot(data=data, x="epoch", y=y, hue="column", hue_order=hue_order,
                     palette=palette, errorbar="sd", ax=ax, legend=ax is ax_loss, **kw)
        ax.set(xlabel="epoch", ylabel=title.split(" (")[0])
        if y == "log_bf":  # the first prune's log BF (~ -1e5) would flatten every later epoch
            ax.set_yscale("symlog", linthresh=1.0)
    ax_sp.axhline(sparsity, color="grey", lw=0.8, ls=":")
    if ax_loss.get_legend():
        handles, labels = ax_loss.get_legend_handles_labels()
        labels = ["pruner" if lab == "column" else lab for lab in labels]
        ax_loss.legend(handles, labels, fontsize="small")
    fig.suptitle(f"{dataset} / {model} — target sparsity {_pct(sparsity)}%"
                 + (f" — {variant}" if variant else ""))
    return save_figure(fig, out_dir, _name(f"curves_{dataset}_{model}_s{slug(_pct(sparsity))}", variant))


def all_learning_curves(runs: pd.DataFrame, history: pd.DataFrame, out_dir: str | Path,
                        variant: str = "") -> list[Path]:
    """`learning_curves` for every (dataset, model, target sparsity) among pruned done runs."""
    lab = label_runs(runs, variant)
    paths = []
    for dataset, model, dm in _keys(lab):
        for s in sorted(dm.loc[dm["column"] != "Unpruned", "sparsity_target"].unique()):
            paths += learning_curves(runs, history, dataset, model, float(s), out_dir, variant)
    return paths


def acc_vs_epoch(runs: pd.DataFrame, history: pd.DataFrame, out_dir: str | Path,
                 variant: str = "") -> list[Path]:
    """Per (dataset, model, pruner): test accuracy vs epoch, one line per target sparsity, with
    the Unpruned run as the 0% line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lab = label_runs(runs, variant)
    paths = []
    for dataset, model, dm in _keys(lab):
        for col in column_order(dm["column"]):
            if col not in set(dm["column"]):
                continue
            sel = dm[(dm["column"] == col) | (dm["column"] == "Unpruned")]
            h = train_history(history).merge(sel[["run_dir", "column"]], on="run_dir")
            h = h.assign(target=h["sparsity_target"].where(h["column"] != "Unpruned", 0.0))
            h["target"] = h["target"].map(lambda s: f"{s:g}%" if s else "0% (unpruned)")
            order = sorted(h["target"].unique(), key=lambda t: float(t.split("%")[0]))
            fig = Figure(figsize=(6.5, 4.2))
            ax = fig.subplots()
            data = h.dropna(subset=["test_acc"])
            if len(data):
                sns.lineplot(data=data, x="epoch", y="test_acc", hue="target", hue_order=order,
                             palette=dict(zip(order, sns.color_palette("viridis", len(order)),
                                              strict=True)), errorbar="sd", ax=ax)
                ax.legend(title="target sparsity", fontsize="small")
            else:
                _empty(ax)
            ax.set(xlabel="epoch", ylabel="test accuracy", title=f"{dataset} / {model} — {col}")
            stem = f"acc_vs_epoch_{dataset}_{model}_{slug(col)}"
            paths += save_figure(fig, out_dir, _name(stem, variant))
    return paths


def acc_vs_sparsity(runs: pd.DataFrame, out_dir: str | Path, variant: str = "",
                    paper: pd.DataFrame | None = None) -> list[Path]:
    """Per (dataset, model): final test accuracy vs target sparsity per pruner (mean ± std over
    seeds), the Unpruned mean as a horizontal line, paper values as dotted lines where known."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paper = load_paper() if paper is None else paper
    lab = label_runs(runs, variant)
    paths = []
    for dataset, model, dm in _keys(lab):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        cols = [c for c in column_order(dm["column"]) if c in set(dm["column"])]
        palette = _palette(cols)
        pruned = dm[dm["column"] != "Unpruned"].dropna(subset=["test_acc"])
        if len(pruned):
            sns.lineplot(data=pruned, x="sparsity_target", y="test_acc", hue="column",
                         hue_order=[c for c in cols if c != "Unpruned"], palette=palette,
                         errorbar="sd", err_style="band", marker="o", ax=ax)
        dense = dm.loc[dm["column"] == "Unpruned", "test_acc"].dropna()
        if len(dense):
            mean, std = dense.mean(), dense.std(ddof=1) if len(dense) > 1 else 0.0
            ax.axhline(mean, color=COLOURS["Unpruned"], lw=1.2, label="Unpruned")
            ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15, lw=0)
        ref = paper[(paper["dataset"] == dataset) & (paper["model"] == model)] if len(paper) else []
        for col in cols if len(ref) else []:
            key = PAPER_COLUMN.get(col)
            if key and key != "unpruned":
                ax.plot(ref["sparsity"], ref[key], ls=":", marker="x", color=palette[col],
                        alpha=0.7, label=f"{col} (paper)")
        if not len(pruned) and not len(dense):
            _empty(ax)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", ncol=2)
        ax.set(xlabel="target sparsity (%)", ylabel="final test accuracy",
               title=f"{dataset} / {model}" + (f" — {variant}" if variant else ""))
        paths += save_figure(fig, out_dir, _name(f"acc_vs_sparsity_{dataset}_{model}", variant))
    return paths


def all_figures(runs: pd.DataFrame, history: pd.DataFrame, out_dir: str | Path,
                variant: str | None = None) -> list[Path]:
    """Every figure above for every (dataset, model[, sparsity, pruner]) present, for one row
    variant or (None) for each variant present."""
    done = runs[runs["status"] == "done"]
    variants = sorted(set(done["variant"])) if variant is None else [variant]
    paths: list[Path] = []
    for v in variants:
        paths += (acc_vs_sparsity(runs, out_dir, v) + acc_vs_epoch(runs, history, out_dir, v)
                  + all_learning_curves(runs, history, out_dir, v))
    return paths

