"""Layer-wise OBS (paper 001): the maths against closed forms, and the prune phase end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_cfg, strip_timings
from torch import nn

from bayes_prune import obs
from bayes_prune.config import ConfigError, validate
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.methods.bayes_factor import layer_target
from bayes_prune.record import CHECKPOINT, METRICS

TIMES = {"layer_seconds", "hessian_seconds", "prune_seconds"}
PRESETS = ["lobs", "lobs_approx", "lobs_approx_retrain", "lobs_sparsegpt", "lobs_magnitude"]


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMES} for h in strip_timings(history)]


def layer_problem(rows: int = 7, d: int = 12, n: int = 300, seed: int = 0):
    """Correlated inputs with the bias's 1 appended, the Hessian (1/N) XᵀX and a random layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.randn(4, d, generator=g,
                                                                          dtype=torch.float64)
    x = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    w = torch.randn(rows, d + 1, generator=g, dtype=torch.float64)
    return x, x.T @ x / n, w


def naive_trace(w: torch.Tensor, hinv: torch.Tensor, n_prunable: int):
    """Greedy OBS on one row with one `downdate` per step: (order, losses, rows after each step)."""
    w, g = w.clone(), hinv.clone()
    gone = torch.zeros(len(w), dtype=torch.bool)
    fixed = torch.arange(len(w)) >= n_prunable
    order, losses, rows = [], [], [w.clone()]
    for _ in range(n_prunable):
        score = torch.where(gone | fixed, math.inf, w.square() / g.diagonal())
        p = int(score.argmin())
        order.append(p)
        losses.append(float(w[p] ** 2 / (2 * g[p, p])))
        w = w - w[p] / g[p, p] * g[:, p]
        gone[p] = True
        w[gone] = 0.0
        rows.append(w.clone())
        g = obs.downdate(g[None], torch.tensor([p]))[0]
    return order, torch.tensor(losses, dtype=torch.float64), torch.stack(rows)


def test_each_downdated_inverse_is_the_inverse_of_the_reduced_hessian():
    _, h, _ = layer_problem()
    g = obs.inverse(h)[None]
    kept = torch.ones(len(h), dtype=torch.bool)
    for p in torch.randperm(len(h), generator=torch.Generator().manual_seed(1))[:-1].tolist():
        g = obs.downdate(g, torch.tensor([p]))
        kept[p] = False
        idx = kept.nonzero().flatten()
        expected = torch.zeros_like(h)
        expected[idx[:, None], idx[None, :]] = torch.linalg.inv(h[idx][:, idx])
        assert torch.allclose(g[0], expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(("row_batch", "block"), [(7, 1), (3, 4), (2, 5), (128, 64)])
def test_the_fast_trace_takes_the_same_steps_as_one_downdate_per_step(row_batch, block):
    _, h, w = layer_problem()
    d = w.shape[1] - 1
    hinv = obs.inverse(h)
    order, losses, rows = obs.obs_traces(w, hinv, d, row_batch, block, keep_weights=True)
    for r in range(len(w)):
        ref_order, ref_losses, ref_rows = naive_trace(w[r], hinv, d)
        assert order[r].tolist() == ref_order
        assert torch.allclose(losses[r], ref_losses, rtol=1e-7, atol=1e-12)
        assert torch.allclose(rows[r], ref_rows, atol=1e-8)


def test_exact_obs_equals_the_least_squares_optimum_with_the_same_weights_at_zero():
    x, h, w = layer_problem()
    d = w.shape[1] - 1
    k = layer_target(w.shape[0] * d, 0.6)
    w_hat, removed = obs.exact_obs(w, h, k, n_fixed=1, block=3)
    assert int(removed.sum()) == k and not removed[:, -1].any()
    _, _, rows = obs.obs_traces(w, obs.inverse(h), d, keep_weights=True)
    target = x @ w.T  # (N, rows): the layer's outputs
    for r in range(len(w)):
        keep = (~removed[r]).nonzero().flatten()
        coef = torch.linalg.lstsq(x[:, keep], target[:, r:r + 1]).solution.flatten()
        expected = torch.zeros_like(w[r])
        expected[keep] = coef
        assert torch.allclose(w_hat[r], expected, atol=1e-8)
        # and the greedy sequence with downdates reaches that optimum after the row's count
        assert torch.allclose(rows[r, int(removed[r].sum())], expected, atol=1e-8)


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.9])
def test_at_equal_sparsity_exact_error_is_at_most_magnitudes_and_approxs(rate):
    _, h, w = layer_problem(rows=16, d=40, n=600, seed=3)
    k = layer_target(16 * 40, rate)
    hd, wp = obs.damped(h, 1e-4), w
    errors = {}
    for name, (w_hat, removed) in {
            "exact": obs.exact_obs(wp, hd, k, 1), "approx": obs.approx_lobs(wp, hd, k, 25, 1),
            "sparsegpt": obs.sparsegpt(wp, hd, k, 1, block=16), "magnitude": obs.magnitude(w, k, 1),
    }.items():
        assert int(removed.sum()) == k
        errors[name] = obs.reconstruction_error(w, w_hat, h)
    assert errors["exact"] <= errors["magnitude"] and errors["exact"] <= errors["approx"]
    assert errors["exact"] <= errors["sparsegpt"]


@pytest.mark.parametrize("variant", ["exact", "approx", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.97])
def test_realised_sparsity_is_exactly_the_target(variant, rate):
    x, h, w = layer_problem(rows=9, d=30, n=400, seed=5)
    h[3, :] = h[:, 3] = 0.0  # a dead input: never nonzero on the calibration set
    k = layer_target(9 * 30, rate)
    if variant == "magnitude":
        w_hat, removed = obs.magnitude(w, k, 1)
    else:
        hd, wp = obs.damped(h, 1e-4), w
        w_hat, removed = {"exact": lambda: obs.exact_obs(wp, hd, k, 1, row_batch=4),
                          "approx": lambda: obs.approx_lobs(wp, hd, k, 40, 1),
                          "sparsegpt": lambda: obs.sparsegpt(wp, hd, k, 1, block=8)}[variant]()
    assert int(removed.sum()) == k
    assert int((w_hat[:, :-1] == 0).sum()) == k
    assert (w_hat[removed] == 0).all() and not removed[:, -1].any()


def test_conv_hessian_from_im2col_patches_gives_the_layers_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2).double()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    h = obs.hessians(conv, {"c": conv}, x, batch_size=4, fold_bias=True)["c"]
    w = obs.layer_matrix(conv, fold_bias=True)
    out = conv(x)
    w_hat, _ = obs.exact_obs(w, obs.damped(h, 1e-6), k=20, n_fixed=1)
    obs.write_layer(conv, w_hat, fold_bias=True)
    with torch.no_grad():
        measured = float((conv(x) - out).square().sum() / out.square().sum())
    assert obs.reconstruction_error(w, w_hat, h) == pytest.approx(measured, rel=1e-9)


# -- the prune phase through the framework --------------------------------------------------------

TINY = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.n_train=256", "dataset.n_test=128",
        "trainer.epochs=1", "trainer.progress=off", "trainer.objective=likelihood",
        "model.hidden=[24,12]", "pruner.calibration_size=128", "sparsity.percent=80"]


def run(tmp_path, overrides, name="run"):
    cfg = validate(compose_cfg(TINY + overrides))
    return run_experiment(cfg, JobContext(run_dir=tmp_path / name, overrides=overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_variant_runs_train_prune_finetune_and_records_each_layer(tmp_path, preset):
    record = run(tmp_path, [f"pruner={preset}", "pruner.prune_output=true", "pruner.interval=60"])
    assert record["status"] == "done"
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [
        ("train", 1), ("prune", None), ("finetune", 1)]
    prune = record["history"][1]
    layers = {"1": 64 * 24, "3": 24 * 12, "5": 12 * 10}
    assert set(prune["reconstruction_error"]) == set(layers) == set(prune["layer_seconds"])
    assert all(0 <= e < 10 for e in prune["reconstruction_error"].values())
    for name, n in layers.items():  # measured from the weights, exactly floor(0.8 n) zeros
        assert prune["sparsity_per_layer"][name] == layer_target(n, 0.8) / n
        assert record["final"]["sparsity_per_layer"][name] == layer_target(n, 0.8) / n
    assert record["final"]["test_acc_pruned"] == prune["test_acc"]
    assert prune["test_acc_before_prune"] == record["history"][0]["test_acc"]


def test_the_cnn_prunes_its_conv_layers_through_im2col(tmp_path):
    record = run(tmp_path, ["pruner=lobs", "model=cnn", "model.channels=[4,6]", "model.hidden=[16]",
                            "dataset.shape=[3,8,8]"])
    prune = record["history"][1]
    assert set(prune["reconstruction_error"]) == {"0", "3", "7"}  # conv, conv, hidden FC
    assert prune["sparsity_per_layer"] == {"0": layer_target(108, 0.8) / 108,
                                           "3": layer_target(216, 0.8) / 216,
                                           "7": layer_target(384, 0.8) / 384}


def test_a_run_starts_from_a_finished_dense_run_with_init_from(tmp_path):
    dense = run(tmp_path, ["pruner=none"], "dense")
    source = tmp_path / "dense"
    record = run(tmp_path, ["pruner=lobs", "pruner.phases=[prune,finetune]",
                            f"pruner.init_from='{source}'"], "pruned")
    assert [h["phase"] for h in record["history"]] == ["prune", "finetune"]
    assert record["history"][0]["test_acc_before_prune"] == dense["final"]["test_acc"]
    with pytest.raises(ConfigError, match="no readable metrics.json"):
        run(tmp_path, ["pruner=lobs", "pruner.init_from='/nonexistent/seed={seed}'"], "x")
    with pytest.raises(ConfigError, match="another model"):
        run(tmp_path, ["pruner=lobs", "model.hidden=[8]", f"pruner.init_from='{source}'"], "y")


def test_a_run_stopped_in_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    overrides = ["pruner=lobs_approx_retrain", "pruner.finetune_epochs=2",
                 "pruner.interval=300"]
    full = run(tmp_path, overrides, "full")
    from bayes_prune import phases

    calls = {"n": 0}
    original = phases.RunState.train_epoch

    def stop_in_second_finetune_epoch(self, epoch, phase, on_batches=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("stopped")
        return original(self, epoch, phase, on_batches)

    monkeypatch.setattr(phases.RunState, "train_epoch", stop_in_second_finetune_epoch)
    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path, overrides, "resumed")
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert ckpt["run"]["position"] == {"cycle": 1, "phase": 2, "epoch": 1}
    monkeypatch.undo()
    resumed = run(tmp_path, overrides, "resumed")
    assert untimed(resumed["history"]) == untimed(full["history"])
    assert resumed["final"]["test_acc"] == full["final"]["test_acc"]
    assert json.loads((tmp_path / "resumed" / METRICS).read_text())["resumes"]


def test_retraining_belongs_to_approx_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="retrain_steps=3: retraining between prunes"):
        validate(compose_cfg(["pruner=lobs", "pruner.retrain_steps=3"]))
    with pytest.raises(ConfigError, match=r"pruner.damping=-1.0: expected a finite number >= 0"):
        validate(compose_cfg(["pruner=lobs", "pruner.damping=-1"]))
    with pytest.raises(ConfigError, match="pruner.phases=\\['train'\\]"):
        validate(compose_cfg(["pruner=lobs", "pruner.phases=[train]"]))


def test_lenet300_100_has_the_papers_266200_prunable_weights():
    cfg = validate(compose_cfg(["model=lenet300_100", "pruner=lobs", "pruner.prune_output=true"]))
    from bayes_prune.methods import method_class

    method = method_class("lobs")(cfg.pruner, cfg)
    net = method.build_model(cfg.model, (1, 28, 28), 10)
    assert sum(m.weight.numel() for m in method.prunable(net).values()) == 266_200


def test_analysis_draws_the_figure_and_writes_the_csv(tmp_path):
    from analysis.lobs import main

    dense = tmp_path / "runs" / "dense"
    run(tmp_path, ["pruner=none"], "runs/dense")
    for preset in ("lobs", "lobs_magnitude"):
        for s in (50, 90):
            run(tmp_path, [f"pruner={preset}", "pruner.phases=[prune,finetune]",
                           f"sparsity.percent={s}", f"pruner.init_from='{dense}'"],
                f"runs/{preset}_{s}")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    for name in ("lobs.png", "lobs.pdf", "lobs.csv", "lobs.md", "lobs.tex"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    import pandas as pd

    csv = pd.read_csv(tmp_path / "out" / "lobs.csv")
    assert set(csv["method"]) == {"Exact OBS (OBC)", "Magnitude"}
    assert set(csv["stage"]) == {"pruned", "finetuned"}
    assert sorted(csv["remaining"].round(6).unique()) == pytest.approx([0.1, 0.5, 1.0], abs=0.01)
    assert (csv["n"] == 1).all()
