"""Paper 003 as a method: evi_cnn / vanilla_cnn under pruner=self_compress, zero kernels, the
iterative retrain loop, resuming inside it, and the settings it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg, mnist_root, needs_mnist, strip_timings

from bayes_prune.config import ConfigError, DatasetConfig, validate
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.methods.self_compress import (
    EVICNN,
    Covariance,
    EVICNNConfig,
    PixelScale,
    SelfCompress,
    VanillaCNNConfig,
    kernel_norms,
    pixel_scale,
    vanilla_cnn,
)
from bayes_prune.record import CHECKPOINT, METRICS
from bayes_prune.run import load_model
from bayes_prune.structure import cut

TINY = ["dataset=synthetic", "dataset.shape=[1,12,12]", "dataset.n_train=256", "dataset.n_test=128",
        "model.kernels=8", "trainer.epochs=3", "trainer.batch_size=16", "trainer.lr=0.01",
        "trainer.progress=off", "pruner=self_compress"]


def run(tmp_path, overrides, name="run"):
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=evi_cnn"]
    cfg = validate(compose_cfg(model + TINY + overrides))
    return run_experiment(cfg, JobContext(run_dir=tmp_path / name, overrides=overrides))


@pytest.mark.parametrize("model", ["evi_cnn", "evi_cnn model.covariance=diagonal", "vanilla_cnn"])
def test_training_lowers_the_loss_and_learns(tmp_path, model):
    record = run(tmp_path, [f"model={model.split()[0]}", *model.split()[1:], "pruner.cycles=1"])
    train = [h for h in record["history"] if h["phase"] == "train"]
    losses = [h["train_loss"] for h in train]
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert record["final"]["test_acc"] > 0.5  # 10 classes
    assert record["config"]["trainer"]["objective"] == "likelihood"


def test_full_and_diagonal_covariance_share_the_mean_path_but_not_the_loss():
    torch.manual_seed(0)
    full = EVICNN(EVICNNConfig(kernels=4), (1, 12, 12), 10, PixelScale())
    diag = EVICNN(EVICNNConfig(kernels=4, covariance=Covariance.diagonal), (1, 12, 12), 10, PixelScale())
    diag.load_state_dict(full.state_dict())
    x = torch.rand(5, 1, 12, 12)
    (m1, c1), (m2, c2) = full(x), diag(x)
    assert torch.allclose(m1, m2) and torch.allclose(m1, torch.softmax(full.logits(x), 1), atol=1e-6)
    assert not torch.allclose(c1, c2)


@pytest.mark.parametrize("kind", ["evi", "vanilla"])
def test_removing_zero_kernels_gives_a_smaller_network_with_the_same_outputs(kind):
    torch.manual_seed(1)
    shape = (1, 12, 12)
    if kind == "evi":
        net = EVICNN(EVICNNConfig(kernels=6), shape, 10, PixelScale((0.1,), (0.3,)))
        conv, name = net.conv, "conv"
    else:
        net = vanilla_cnn(VanillaCNNConfig(kernels=6), shape, 10, PixelScale((0.1,), (0.3,)))
        conv, name = net[1], "1"
    with torch.no_grad():
        conv.weight[[1, 4]] = 0.0
        conv.weight[2] *= 1e-8  # ||M_k|| <= 1e-7: a zero kernel that is not exactly zero
    norms = kernel_norms(net)
    assert int((norms <= 1e-7).sum()) == 3
    small = cut(net, {name: norms > 1e-7}, shape)
    x = torch.randn(7, *shape)
    n_params = sum(p.numel() for p in net.parameters())
    per_kernel = 25 + (1 if kind == "evi" else 0) + 10 * 4 * 4  # kernel, its variance, FC columns
    assert sum(p.numel() for p in small.parameters()) == n_params - 3 * per_kernel
    with torch.no_grad():
        if kind == "evi":
            assert small.conv.out_channels == 3
            (m1, c1), (m2, c2) = net(x), small(x)
            assert torch.allclose(m1, m2, atol=1e-6)
            assert torch.allclose(net.logits(x), small.logits(x), atol=1e-5)
            # the covariance too when the kernels are exactly zero (ReLU passes none of their
            # variance); a kernel of norm 1e-8 still passes sigma_k^2 P P^T where its mean is > 0
            exact = cut(net, {name: norms > 0}, shape)
            assert torch.allclose(exact(x)[1], c1, rtol=1e-5, atol=1e-10)
            assert not torch.allclose(c2, c1, rtol=1e-3)
        else:
            assert torch.allclose(net(x), small(x), atol=1e-5)


def test_the_iterative_loop_retrains_with_n_minus_z_kernels_until_none_is_zero(tmp_path):
    # a threshold far above 1e-7 makes small kernels "zero" on this tiny problem: it exercises the
    # loop's mechanics (every experiment runs with the paper's 1e-7)
    record = run(tmp_path, ["pruner.threshold=0.45", "pruner.cycles=4"])
    history = record["history"]
    compresses = [h for h in history if h["phase"] == "compress"]
    cycles = record["final"]["cycles"]
    assert len(cycles) == len(compresses) == max(h["cycle"] for h in history)
    kernels = [c["kernels"] for c in cycles]
    zeros = [c["zero_kernels"] for c in cycles]
    assert kernels[0] == 8 and sum(zeros) > 0
    for i in range(1, len(cycles)):  # each cycle trains N - Z kernels from scratch
        assert kernels[i] == kernels[i - 1] - zeros[i - 1]
        first = next(h for h in history if h["phase"] == "train" and h["cycle"] == i + 1)
        assert first["epoch"] == 1 and first["kernels"] == kernels[i]
    last = compresses[-1]
    final = record["final"]
    if zeros[-1] == 0:  # the loop ended on its own
        assert not last["changed"] and final["kernels"] == kernels[-1]
    else:  # out of cycles: the last count's zero kernels are removed without retraining
        assert last["changed"] and last["restart"] == "removed"
        assert final["kernels"] == kernels[-1] - zeros[-1]
    assert final["kernels"] < 8 and final["storage_floats"] == 26 * final["kernels"]
    assert final["units_removed"] == {"conv": 8 - final["kernels"]}
    assert all(len(c["kernel_norms"]) == c["kernels"] for c in cycles)
    model = load_model(tmp_path / "run")  # model.pt reloads into the smaller network
    assert model.conv.out_channels == final["kernels"]


def test_warm_restarts_go_on_from_the_surviving_kernels(tmp_path):
    record = run(tmp_path, ["pruner.threshold=0.45", "pruner.cycles=2", "pruner.restart=warm"])
    first = record["final"]["cycles"][0]
    assert first["zero_kernels"] > 0
    compress = next(h for h in record["history"] if h["phase"] == "compress")
    assert compress["restart"] == "warm"
    # the compress step's accuracy is the cut network's, trained kernels kept (not a fresh net)
    assert compress["test_acc"] == pytest.approx(compress["test_acc_removed"])


def test_a_run_stopped_inside_the_loop_resumes_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["pruner.threshold=0.45", "pruner.cycles=3"]
    full = run(tmp_path, args, "full")
    assert len(full["final"]["cycles"]) >= 2
    calls = []
    original = SelfCompress.compress

    def stop_at_second(self, run_state):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(self, run_state)

    with monkeypatch.context() as m:
        m.setattr(SelfCompress, "compress", stop_at_second)
        with pytest.raises(RuntimeError):
            run(tmp_path, args, "resumed")
    stopped = json.loads((tmp_path / "resumed" / METRICS).read_text())
    assert stopped["status"] == "failed"
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert ckpt["run"]["position"]["cycle"] == 2 and ckpt["run"]["widths"]  # a cut network
    resumed = run(tmp_path, args, "resumed")
    assert strip_timings(resumed["history"]) == strip_timings(full["history"])
    assert strip_timings(resumed["final"]) == strip_timings(full["final"])


# -- configuration ---------------------------------------------------------------------------------


def test_the_elbo_replaces_the_paper_000_prior_objective():
    cfg = validate(compose_cfg(["model=evi_cnn", "pruner=self_compress"]))
    assert cfg.trainer.objective.value == "likelihood"
    assert validate(compose_cfg(["pruner=none"])).trainer.objective.value == "posterior"


def test_evi_cnn_under_another_pruner_is_refused_before_any_data(tmp_path):
    cfg = validate(compose_cfg(["model=evi_cnn", "pruner=none", "dataset=synthetic"]))
    with pytest.raises(ConfigError, match="pruner=self_compress"):
        run_experiment(cfg, JobContext(run_dir=tmp_path / "r", overrides=[]))
    assert not (tmp_path / "r" / METRICS).exists()


def test_vanilla_cnn_with_unit_pixels_needs_self_compress_and_standardized_runs_anywhere(tmp_path):
    base = ["model=vanilla_cnn", "pruner=magnitude", "sparsity.percent=50"] + TINY[:4]
    with pytest.raises(ConfigError, match="model.pixels=standardized"):
        run_experiment(validate(compose_cfg(base)), JobContext(run_dir=tmp_path / "a", overrides=[]))
    cfg = validate(compose_cfg(base + ["model.pixels=standardized", "trainer.epochs=1",
                                       "model.kernels=4", "trainer.progress=off"]))
    record = run_experiment(cfg, JobContext(run_dir=tmp_path / "b", overrides=[]))
    assert record["status"] == "done" and record["final"]["sparsity"] == pytest.approx(0.5)


def test_unit_pixels_undo_the_datasets_standardisation():
    from bayes_prune.data import STATS

    scale = pixel_scale(DatasetConfig(name="mnist"), EVICNNConfig().pixels)
    mean, std = STATS[DatasetConfig(name="mnist").name]
    x01 = torch.rand(2, 1, 4, 4)
    assert torch.allclose(scale((x01 - mean[0]) / std[0]), x01, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ("pruner.threshold=-1", "pruner.threshold=-1"), ("pruner.tau=nan", "pruner.tau"),
    ("pruner.kl=l2", "kl"), ("model.kernels=0", "model.kernels=0"),
    ("model.covariance=low", "covariance"), ("pruner.restart=hot", "restart"),
])
def test_bad_settings_fail_with_the_value_named(bad, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ConfigError, ConfigCompositionException)) as err:
        validate(compose_cfg(["model=evi_cnn", "pruner=self_compress", bad]))
    assert message in str(err.value) + str(err.value.__cause__)


def test_out_of_cycles_the_zero_kernels_are_removed_without_retraining(tmp_path):
    record = run(tmp_path, ["pruner.threshold=0.45", "pruner.cycles=1"])
    (cycle,) = record["final"]["cycles"]
    compress = record["history"][-1]
    assert cycle["zero_kernels"] > 0 and compress["restart"] == "removed"
    assert record["final"]["kernels"] == 8 - cycle["zero_kernels"]
    assert record["final"]["test_acc"] == pytest.approx(cycle["test_acc_removed"])


# -- analysis ---------------------------------------------------------------------------------------


@needs_mnist
def test_analysis_draws_fig5_figs2_to_4_and_writes_the_tables(tmp_path, monkeypatch):
    from analysis.evi import main as analyse
    from analysis.evi import variant_of

    monkeypatch.setenv("BAYES_PRUNE_DATA", str(mnist_root()))
    base = ["dataset=mnist", "dataset.train_subset=256", "dataset.test_subset=256",
            "trainer.epochs=1", "trainer.batch_size=16", "trainer.lr=0.0016", "trainer.progress=off",
            "pruner=self_compress", "pruner.cycles=1", f"paths.data_dir={mnist_root()}"]
    records = []
    for model, n in (("evi_cnn", 100), ("vanilla_cnn", 100), ("vanilla_cnn", 6)):
        cfg = validate(compose_cfg(base + [f"model={model}", f"model.kernels={n}"]))
        records.append(run_experiment(cfg, JobContext(tmp_path / "runs" / f"{model}{n}", [])))
    variant = variant_of(records[0]["config"])
    assert variant == "epochs=1,train_subset=256"
    out = tmp_path / "analysis"
    assert analyse([str(tmp_path / "runs"), "--out", str(out), "--variant", variant]) == 0
    for name in ("fig5_accuracy_vs_kernels", "fig2_kernel_norms_mnist_n100",
                 "fig3_kernel_norms_mnist"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").exists()
    for table in ("zero_kernels", "storage", "loops"):
        assert all((out / f"{table}.{ext}").exists() for ext in ("md", "tex", "csv"))
    zk = (out / "zero_kernels.md").read_text()
    assert "| MNIST | 100 | Bayesian eVI |" in zk and "| MNIST | 6 | vanilla |" in zk
    storage = (out / "storage.csv").read_text().splitlines()
    assert len(storage) == 2 and storage[1].startswith("MNIST,")
