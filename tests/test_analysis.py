"""Tests for the analysis package on run trees written into tmp_path."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.collect import collect
from analysis.report import render_report
from analysis.table import MISSING, load_paper, table1, tidy, to_latex, to_markdown, write_table1

GATES = {"none": "none", "random": "none", "magnitude": "none",
         "bayes_random": "lagged", "bayes_magnitude": "lagged"}


def write_run(root: Path, *, dataset: str = "mnist", model: str = "fcn", pruner: str = "none",
              sparsity: float = 0.0, seed: int = 0, test_acc: float = 0.9,
              realised: float | None = None, epochs: int = 3, status: str = "done",
              gate: str | None = None, lr: float = 1e-3, **pruner_kw) -> Path:
    """Write a schema-1 metrics.json for one run (analysis reads old records) and return its
    directory."""
    run_dir = root / dataset / model / pruner / f"sparsity={sparsity:g}" / f"lr={lr:g}" / f"seed={seed}"
    gate = gate or GATES[pruner]
    if gate == "tentative":
        run_dir = run_dir.parent / "gate=tentative" / run_dir.name
    realised = sparsity / 100 if realised is None else realised
    config = {
        "dataset": {"name": dataset}, "model": {"name": model},
        "pruner": {"name": pruner, "method": pruner.removeprefix("bayes_"), "gate": gate,
                   "beta": 1.0, "schedule": "oneshot", "mask": "persistent",
                   "prune_output": False} | pruner_kw,
        "prior": {"name": "gaussian", "sigma": 1.0, "scale": 1.0},
        "sparsity": {"percent": sparsity},
        "trainer": {"epochs": epochs, "lr": lr, "batch_size": 64, "objective": "posterior"},
        "seed": seed, "name": "test", "resume": True,
    }
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": test_acc, "test_loss": 1.2 / e,
                "test_acc": test_acc - 0.01 * (epochs - e), "test_loss_before_prune": 1.1 / e,
                "test_acc_before_prune": test_acc, "log_prior": -10.0, "log_likelihood": -5.0,
                "log_bf": float("nan") if e == 1 else 0.5 * e, "gate_open": True,
                "pruned": pruner != "none", "target_sparsity": sparsity / 100,
                "sparsity": realised * e / epochs, "sparsity_per_layer": {"fc1": realised},
                "epoch_seconds": 0.1, "evidence_seconds": 0.01} for e in range(1, epochs + 1)]
    final = {"test_acc": test_acc, "test_loss": 0.3, "sparsity": realised,
             "sparsity_per_layer": {"fc1": realised}, "params_total": 1000,
             "params_nonzero": 1000 - int(1000 * realised), "compression": 1 / (1 - realised),
             "target_sparsity": sparsity / 100, "epoch_target_reached": 1, "wall_seconds": 1.0,
             "epochs": epochs}
    data = {"schema_version": 1, "status": status, "error": None, "run_dir": str(run_dir),
            "config": config, "seed": seed, "device": "cpu", "versions": {},
            "started_at": "", "updated_at": "", "history": history,
            "final": final if status == "done" else None}
    if status == "failed":
        data["error"] = {"type": "RuntimeError", "message": "CUDA out of memory", "traceback": ""}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(data))
    return run_dir


# mnist/fcn: unpruned 2 seeds, bayes_magnitude and magnitude at 90% with 3 seeds, random at 50%.
UNPRUNED = [0.980, 0.976]
BM90 = [0.975, 0.979, 0.971]
MAG90 = [0.970, 0.968, 0.974]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, acc in enumerate(UNPRUNED):
        write_run(root, seed=seed, test_acc=acc)
    for seed, acc in enumerate(BM90):
        write_run(root, pruner="bayes_magnitude", sparsity=90, seed=seed, test_acc=acc,
                  realised=0.9 - 0.001 * seed)
    for seed, acc in enumerate(MAG90):
        write_run(root, pruner="magnitude", sparsity=90, seed=seed, test_acc=acc)
    write_run(root, pruner="random", sparsity=50, seed=0, test_acc=0.95)
    return root


def test_table_cells_match_hand_computation(tree: Path) -> None:
    col = collect(tree)
    assert len(col.runs) == 9 and col.problems.empty
    assert set(col.runs["variant"]) == {""} and set(col.runs["pruner_variant"]) == {""}
    t = table1(col.runs)
    assert list(t.index) == [("mnist", "fcn", "", 50.0), ("mnist", "fcn", "", 90.0)]
    assert list(t.columns.get_level_values(0).unique()) == [
        "Unpruned", "Random", "Bayes Random", "Magnitude", "Bayes Magnitude"]

    bm = t.loc[("mnist", "fcn", "", 90.0), "Bayes Magnitude"]
    assert bm["mean"] == pytest.approx(statistics.mean(BM90))
    assert bm["std"] == pytest.approx(statistics.stdev(BM90))  # sample std, ddof=1
    assert bm["n"] == 3
    assert bm["realised_sparsity"] == pytest.approx(100 * (0.9 + 0.899 + 0.898) / 3)
    assert bm["paper"] == pytest.approx(0.9772)
    assert bm["diff"] == pytest.approx(statistics.mean(BM90) - 0.9772)
    mag = t.loc[("mnist", "fcn", "", 90.0), "Magnitude"]
    assert mag["mean"] == pytest.approx(statistics.mean(MAG90)) and mag["paper"] == 0.9768

    # Unpruned is repeated on every sparsity row with the same statistics.
    for s in (50.0, 90.0):
        un = t.loc[("mnist", "fcn", "", s), "Unpruned"]
        assert un["mean"] == pytest.approx(statistics.mean(UNPRUNED))
        assert un["std"] == pytest.approx(statistics.stdev(UNPRUNED))
        assert un["n"] == 2 and un["paper"] == pytest.approx(0.9782)

    # A single seed has no std; the CSV layout is one row per (dataset, model, sparsity, column).
    rnd = t.loc[("mnist", "fcn", "", 50.0), "Random"]
    assert rnd["n"] == 1 and math.isnan(rnd["std"]) and rnd["paper"] == pytest.approx(0.9684)
    csv = tidy(t)
    assert list(csv.columns) == ["dataset", "model", "variant", "sparsity", "column", "mean", "std",
                                 "n", "realised_sparsity", "paper", "diff"]
    assert len(csv) == 2 * 5
    md = to_markdown(t)
    assert f"{statistics.mean(BM90):.4f} ± {statistics.stdev(BM90):.4f} (n=3" in md
    assert "paper 0.9772" in md and "Δ -0.0022" in md


def test_only_done_runs_count_and_history_is_tidy(tree: Path) -> None:
    write_run(tree, pruner="bayes_magnitude", sparsity=90, seed=7, test_acc=0.1, status="running")
    col = collect(tree)
    assert col.status_counts() == {"done": 9, "running": 1}
    assert table1(col.runs).loc[("mnist", "fcn", "", 90.0), ("Bayes Magnitude", "n")] == 3
    assert len(col.history) == 10 * 3
    assert {"dataset", "model", "pruner", "seed", "epoch", "test_acc", "log_bf"} <= set(
        col.history.columns)
    # a running record that no live process holds was stopped (killed): resumable
    assert col.problems["reason"].str.startswith("stopped while running").tolist() == [True]


def test_broken_runs_are_reported_and_outputs_still_render(tree: Path, tmp_path: Path) -> None:
    truncated = tree / "mnist" / "fcn" / "random" / "sparsity=90" / "seed=0"
    truncated.mkdir(parents=True)
    (truncated / "metrics.json").write_text('{"schema_version": 1, "status": "do')
    failed = write_run(tree, pruner="random", sparsity=90, seed=1, status="failed")
    diverged = write_run(tree, pruner="bayes_magnitude", sparsity=90, seed=9, test_acc=math.nan)

    col = collect(tree)
    problems = dict(zip(col.problems["run_dir"], col.problems["reason"], strict=True))
    assert "unreadable" in problems[str(truncated)]
    assert "RuntimeError: CUDA out of memory" in problems[str(failed)]
    assert "NaN" in problems[str(diverged)]
    assert col.status_counts() == {"done": 10, "failed": 1, "unreadable": 1}

    t = table1(col.runs)
    assert t.loc[("mnist", "fcn", "", 90.0), ("Random", "n")] == 0
    bm = t.loc[("mnist", "fcn", "", 90.0), "Bayes Magnitude"]
    assert bm["n"] == 3 and bm["mean"] == pytest.approx(statistics.mean(BM90))
    paths = write_table1(t, tmp_path / "out")
    assert all(p.stat().st_size > 0 for p in paths)
    html = render_report(col, t)
    assert str(truncated) in html and "CUDA out of memory" in html and "<table" in html


def test_running_only_tree_renders(tmp_path: Path) -> None:
    write_run(tmp_path, pruner="random", sparsity=90, status="running")
    col = collect(tmp_path)
    t = table1(col.runs)
    assert t.empty and "No finished runs" in to_markdown(t)
    assert "running" in render_report(col, t)


def test_tentative_gate_gets_its_own_column(tree: Path) -> None:
    for seed, acc in enumerate([0.960, 0.964]):
        write_run(tree, pruner="bayes_magnitude", sparsity=90, seed=seed, test_acc=acc,
                  gate="tentative")
    col = collect(tree)
    assert set(col.runs["pruner_variant"]) == {"", "gate=tentative"}
    assert set(col.runs["variant"]) == {""}  # a pruner setting makes a column, not a row
    t = table1(col.runs)
    cols = list(t.columns.get_level_values(0).unique())
    assert cols[-2:] == ["Bayes Magnitude", "Bayes Magnitude (gate=tentative)"]
    tent = t.loc[("mnist", "fcn", "", 90.0), "Bayes Magnitude (gate=tentative)"]
    assert tent["n"] == 2 and tent["mean"] == pytest.approx(0.962)
    assert tent["paper"] == pytest.approx(0.9772)  # compared with the paper's Bayes column
    # The lagged column is unchanged by the tentative runs.
    assert t.loc[("mnist", "fcn", "", 90.0), ("Bayes Magnitude", "n")] == 3
    assert "Bayes Magnitude (gate=tentative)" in to_latex(t)


def test_runs_differing_only_in_lr_are_separate_rows_never_averaged(tree: Path) -> None:
    for seed, acc in enumerate([0.50, 0.52]):
        write_run(tree, pruner="magnitude", sparsity=90, seed=seed, test_acc=acc, lr=0.01)
    col = collect(tree)
    assert set(col.runs["variant"]) == {"", "lr=0.01"}
    t = table1(col.runs)
    assert ("mnist", "fcn", "lr=0.01", 90.0) in t.index
    fast = t.loc[("mnist", "fcn", "lr=0.01", 90.0)]
    assert fast[("Magnitude", "n")] == 2 and fast[("Magnitude", "mean")] == pytest.approx(0.51)
    assert fast[("Unpruned", "n")] == 0  # no unpruned run at lr=0.01
    assert t.loc[("mnist", "fcn", "", 90.0), ("Magnitude", "mean")] == pytest.approx(
        statistics.mean(MAG90))
    only = table1(col.runs, variant="lr=0.01")
    assert list(only.index) == [("mnist", "fcn", "lr=0.01", 90.0)]
    assert "lr=0.01" in to_markdown(t)


def test_a_pruner_setting_gets_its_own_column(tree: Path) -> None:
    write_run(tree / "regrow", pruner="magnitude", sparsity=90, seed=0, test_acc=0.5,
              mask="regrow")
    t = table1(collect(tree).runs)
    row = t.loc[("mnist", "fcn", "", 90.0)]
    assert row[("Magnitude (mask=regrow)", "n")] == 1
    assert row[("Magnitude (mask=regrow)", "mean")] == pytest.approx(0.5)
    assert row[("Magnitude", "n")] == 3 and row[("Unpruned", "n")] == 2


def test_the_same_run_in_two_directories_counts_once(tree: Path) -> None:
    copy = write_run(tree / "zz_copy", pruner="magnitude", sparsity=90, seed=0, test_acc=0.1)
    col = collect(tree)
    assert t_n(col, "Magnitude") == 3
    dup = col.problems[col.problems["status"] == "duplicate"]
    assert dup["run_dir"].tolist() == [str(copy)]


def t_n(col, column: str) -> int:
    return int(table1(col.runs).loc[("mnist", "fcn", "", 90.0), (column, "n")])


def test_missing_cells_and_datasets_without_paper_values(tree: Path) -> None:
    write_run(tree, dataset="digits", pruner="random", sparsity=75, test_acc=0.8)
    t = table1(collect(tree).runs)
    assert list(t.index.get_level_values("dataset").unique()) == ["mnist", "digits"]
    digits = t.loc[("digits", "fcn", "", 75.0)]
    assert digits[("Random", "n")] == 1 and math.isnan(digits[("Random", "paper")])
    assert digits[("Unpruned", "n")] == 0 and math.isnan(digits[("Unpruned", "mean")])

    md = to_markdown(t).splitlines()
    digits_line = next(line for line in md if line.startswith("| digits"))
    cells = [c.strip() for c in digits_line.strip("|").split("|")]
    assert cells[3] == MISSING and cells[4] == "0.8000 (n=1, 75.0%)" and cells[5] == MISSING
    # A missing cell that the paper has keeps the paper value: Bayes Random at mnist/fcn/90.
    mnist90 = next(line for line in md if line.startswith("| mnist") and "| 90 " in line)
    assert f"{MISSING} [paper 0.9657]" in mnist90
    assert "--" in to_latex(t)


def test_paper_table_is_packaged() -> None:
    paper = load_paper()
    assert len(paper) == 30
    assert set(paper["dataset"]) == {"mnist", "fashion_mnist", "cifar10"}
    row = paper[(paper["dataset"] == "mnist") & (paper["model"] == "fcn")
                & (paper["sparsity"] == 90)]
    assert row["bayes_magnitude"].item() == pytest.approx(0.9772)


def test_cli_end_to_end(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tree / "broken").mkdir()
    (tree / "broken" / "metrics.json").write_text("{")
    assert main([str(tree)]) == 0
    out = tree / "analysis"
    for name in ("table1.md", "table1.tex", "table1.csv", "report.html"):
        assert (out / name).stat().st_size > 0
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"acc_vs_sparsity_mnist_fcn.png", "acc_vs_sparsity_mnist_fcn.pdf",
            "curves_mnist_fcn_s90.png", "curves_mnist_fcn_s90.pdf",
            "acc_vs_epoch_mnist_fcn_bayes_magnitude.png"} <= names
    csv = pd.read_csv(out / "table1.csv")
    assert len(csv) == 10 and csv["n"].sum() == 3 + 3 + 1 + 2 * 2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len([n for n in names if n.endswith(".png")])
    printed = capsys.readouterr().out
    assert "unreadable" in printed and "| mnist" in printed and "report.html" in printed

    # A second run must not pick up anything inside the output directory.
    (out / "nested").mkdir()
    write_run(out / "nested", pruner="random", sparsity=90, test_acc=0.1)
    assert main([str(tree), "--no-figures"]) == 0
    assert pd.read_csv(out / "table1.csv")["n"].sum() == csv["n"].sum()


def test_cli_exit_code_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_runs_of_a_family_with_its_own_analysis_are_handed_to_it(tmp_path):
    from conftest import compose_cfg

    from bayes_prune.config import validate
    from bayes_prune.experiment import JobContext, run_experiment

    tiny = ["dataset=synthetic", "dataset.n_train=64", "dataset.n_test=32", "trainer.epochs=1",
            "trainer.progress=off"]
    for name, extra in (("evi", ["model=evi_cnn", "model.kernels=4", "pruner=self_compress",
                                 "pruner.cycles=1"]),
                        ("plain", ["pruner=magnitude", "sparsity.percent=50"])):
        record = run_experiment(validate(compose_cfg(tiny + extra)),
                                JobContext(tmp_path / "runs" / name, []))
        assert record["status"] == "done"
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--no-figures"]) == 0
    assert (out / "evi" / "zero_kernels.md").exists()  # analysis.evi wrote the family's tables
    rows = pd.read_csv(out / "table1.csv")
    assert set(rows["model"]) == {"fcn"}, "Table 1 holds the paper-000 run only"
