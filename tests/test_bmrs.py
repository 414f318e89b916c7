"""BMRS (paper 002) as a method of the framework: noise layers in the network, masks recomputed
from ΔF, the compress phase cutting exactly the units with ΔF >= 0, cut and exported networks
equal to the masked one, continuous and post-training runs end to end, and the data options."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg, mnist_root, needs_mnist

from bayes_prune import truncnorm
from bayes_prune.bmrs_layers import LogUniformNoise, export, noise_layers
from bayes_prune.config import ConfigError, validate
from bayes_prune.data import input_shape, load_data
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.methods import method_class
from bayes_prune.methods.bmrs import paper_compression
from bayes_prune.record import METRICS
from bayes_prune.run import RunState, load_model

TINY = ["experiment=bmrs_base", "dataset=synthetic", "dataset.shape=[1,32,32]", "dataset.n_train=320",
        "dataset.n_test=128", "trainer.batch_size=32", "trainer.epochs=2", "pruner.finetune_epochs=2",
        "trainer.progress=off", "trainer.threads=1"]
MLP = ["model=bmrs_mlp", "model.hidden=12", "model.n_layers=2"]
# small batches, a large step and wide initial posteriors: about half the units reach ΔF >= 0 in 6 epochs
PRUNES = [*MLP, "trainer.batch_size=8", "trainer.lr=0.03", "pruner.init_logsigma=-1", "trainer.epochs=6"]


def config(overrides: list[str]):
    return validate(compose_cfg(TINY + overrides))


def run(tmp_path, overrides, name="run"):
    return run_experiment(config(overrides), JobContext(run_dir=tmp_path / name, overrides=overrides))


def run_state(overrides: list[str]) -> RunState:
    cfg = config(overrides)
    method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
    torch.manual_seed(0)
    data = load_data(cfg.dataset, cfg.paths.data_dir, torch.device("cpu"))
    state = RunState(cfg, method, data, torch.device("cpu"))
    method.start(state)
    return state


def set_posteriors(model, prune_every: int = 3) -> dict[str, torch.Tensor]:
    """Give every `prune_every`-th unit a posterior at the spike (mu = a, sigma = 1: ΔF >= 0) and
    the others an active one (mu = -0.5, log sigma = -3: ΔF << 0); returns the expected keep masks."""
    expected = {}
    for i, (name, layer) in enumerate(noise_layers(model).items()):
        n = layer.mu.numel()
        pruned = torch.arange(n) % prune_every == i % prune_every
        with torch.no_grad():
            layer.mu.copy_(torch.where(pruned, torch.tensor(truncnorm.A), torch.tensor(-0.5)))
            layer.logsigma.copy_(torch.where(pruned, torch.tensor(0.0), torch.tensor(-3.0)))
        expected[name] = ~pruned
    return expected


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("model", [MLP, ["model=lenet5"]])
def test_noise_layers_follow_every_hidden_activation_and_none_has_none(model):
    state = run_state(["pruner=bmrs_n", *model])
    layers = noise_layers(state.model)
    widths = [m.mu.numel() for m in layers.values()]
    assert widths == ([12, 12, 12] if model == MLP else [6, 16, 120, 84])
    assert not noise_layers(run_state(["pruner=bmrs_none", *model]).model)


@pytest.mark.parametrize("pruner", ["bmrs_n", "bmrs_n_exact"])
def test_compress_cuts_exactly_the_units_with_delta_f_at_least_zero_and_keeps_the_outputs(pruner):
    state = run_state([f"pruner={pruner}", "model=lenet5"])
    method = state.method
    expected = set_posteriors(state.model)
    delta_f = {n: truncnorm.delta_f_normal(layer.mu.detach().double(), layer.sigma().detach().double(),
                                           exact=pruner == "bmrs_n_exact")
               for n, layer in noise_layers(state.model).items()}
    assert all(torch.equal(delta_f[n] < 0, expected[n]) for n in expected)
    fields = method.epoch_end(state, 1)
    assert fields["pruned"] and fields["units_kept"] == {n: int(k.sum()) for n, k in expected.items()}
    x = torch.randn(5, 1, 32, 32)
    masked = outputs(state.model, x)
    kept_mu = {n: layer.mu.detach()[expected[n]].clone() for n, layer in noise_layers(state.model).items()}
    method.compress(state)
    cut_layers = noise_layers(state.model)
    assert {n: m.mu.numel() for n, m in cut_layers.items()} == {n: int(k.sum()) for n, k in expected.items()}
    assert all(torch.equal(cut_layers[n].mu.detach(), kept_mu[n]) for n in kept_mu)
    assert torch.allclose(outputs(state.model, x), masked, atol=1e-5)
    # the export: noise folded into the next layers, a plain Linear/Conv2d network, same outputs
    plain = export(state.model)
    assert not any(isinstance(m, LogUniformNoise) for m in plain.modules())
    assert torch.allclose(outputs(plain, x), masked, atol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) < state.dense.params


def test_a_unit_pruned_after_one_epoch_can_come_back_after_the_next():
    state = run_state(["pruner=bmrs_n", *MLP])
    expected = set_posteriors(state.model)
    state.method.epoch_end(state, 1)
    name, layer = next(iter(noise_layers(state.model).items()))
    unit = int((~expected[name]).nonzero()[0])
    assert float(state.model.get_submodule(name).weight.detach()[unit].abs().sum()) == 0
    with torch.no_grad():  # its posterior moves away from the spike (the KL alone moves it in training)
        layer.mu[unit], layer.logsigma[unit] = -0.5, -3.0
    fields = state.method.epoch_end(state, 2)
    assert fields["units_flipped"] == 1 and bool(state.method.keep[name][unit])
    assert bool(state.masks[f"{name}.weight"][unit].all())  # its weights train again (from zero)
    # the noise parameters are never masked: a pruned unit's posterior keeps following the KL
    assert not any(k.endswith((".mu", ".logsigma")) for k in state.masks)


def test_a_layer_that_loses_every_unit_is_cut_to_one_zero_placeholder():
    state = run_state(["pruner=bmrs_n", "model=lenet5"])
    set_posteriors(state.model)
    first = next(iter(noise_layers(state.model).values()))
    with torch.no_grad():
        first.mu.fill_(truncnorm.A)
        first.logsigma.fill_(0.0)
    state.method.epoch_end(state, 1)
    x = torch.randn(4, 1, 32, 32)
    masked = outputs(state.model, x)
    state.method.compress(state)
    conv = state.model.get_submodule("0")
    assert conv.out_channels == 1 and float(conv.weight.detach().abs().sum()) == 0
    assert torch.allclose(outputs(state.model, x), masked, atol=1e-6)
    assert torch.allclose(masked, masked[:1].expand_as(masked))  # a constant function of the input


def test_paper_compression_counts_noise_rows_and_columns_but_not_across_the_flatten():
    state = run_state(["pruner=bmrs_n", "model=lenet5"])
    keep = {n: torch.ones(m.mu.numel(), dtype=torch.bool) for n, m in noise_layers(state.model).items()}
    names = list(keep)
    keep[names[1]][0] = False  # one conv2 channel: 150 weights + 2 noise + its conv->FC columns (not)
    keep[names[2]][0] = False  # one FC1 unit: 400 weights in, 84 out, 2 noise
    state.method.apply_keep(state, keep)
    total = sum(p.numel() for p in state.model.parameters())
    removed = paper_compression(state.model, keep) * total
    assert round(removed) == (150 + 2) + (400 + 84 + 2)


def test_noise_methods_never_train_with_paper_000s_weight_prior():
    from bayes_prune.config import Objective

    for pruner in ("bmrs_n", "bmrs_none", "bmrs_post", "l2"):
        cfg = validate(compose_cfg([f"pruner={pruner}", "model=bmrs_mlp"]))
        assert cfg.trainer.objective is Objective.likelihood
    assert validate(compose_cfg(["pruner=magnitude"])).trainer.objective is Objective.posterior


def test_bad_settings_are_refused_before_any_compute():
    with pytest.raises(ConfigError, match="finetune_select=best_val: it needs a validation set"):
        validate(compose_cfg(TINY + ["pruner=bmrs_n", *MLP, "dataset.val_fraction=null"]))
    with pytest.raises(ConfigError, match="pruner.unit_percent"):
        validate(compose_cfg(TINY + ["pruner=l2", *MLP, "pruner.unit_percent=20"]))
    from bayes_prune.experiment import check_buildable

    cfg = validate(compose_cfg(TINY + ["pruner=bmrs_n", "model=lenet5", "dataset.shape=[1,28,28]"]))
    with pytest.raises(ConfigError, match="LeNet5 takes 32 x 32 images"):
        check_buildable(cfg, method_class("bmrs_n")(cfg.pruner, cfg))


def test_continuous_run_prunes_finetunes_on_the_best_validation_epoch_and_cuts(tmp_path):
    record = run(tmp_path, ["pruner=bmrs_n", *PRUNES, "pruner.finetune_epochs=3"])
    assert record["status"] == "done"
    hist = record["history"]
    assert [h["phase"] for h in hist] == ["train"] * 6 + ["finetune"] * 3 + ["compress"]
    finetune = [h for h in hist if h["phase"] == "finetune"]
    best = max(finetune, key=lambda h: h["val_acc"])
    assert [h.get("selected", False) for h in finetune] == [h is best for h in finetune]
    final = record["final"]
    assert final["test_acc"] == pytest.approx(best["test_acc"])
    assert 0 < final["unit_compression"] < 1 and final["kernel"] in ("c", "torch")
    kept = hist[5]["units_kept"]  # the masks of the last training epoch, frozen in fine-tuning
    assert final["units_remaining"] == kept and final["architecture"]["widths"] == kept
    assert final["params_total"] < final["params_dense"]
    model = load_model(tmp_path / "run")  # model.pt loads into the cut architecture
    assert [m.mu.numel() for m in noise_layers(model).values()] == list(kept.values())


def test_l2_prunes_as_many_units_as_the_matching_bmrs_n_run(tmp_path):
    common = PRUNES
    bmrs = run(tmp_path, ["pruner=bmrs_n", *common], "sweep/bmrs_n")
    l2 = run(tmp_path, ["pruner=l2", *common, f"pruner.match_dir={tmp_path / 'sweep'}"], "sweep/l2")
    prune = next(h for h in l2["history"] if h["phase"] == "prune")
    assert prune["target_unit_percent"] == pytest.approx(100 * bmrs["final"]["unit_compression"])
    assert prune["unit_compression"] == pytest.approx(bmrs["final"]["unit_compression"], abs=1 / 36)
    with pytest.raises(FileNotFoundError, match="no finished pruner=bmrs_n run with seed 1"):
        run(tmp_path, ["pruner=l2", *common, "seed=1", f"pruner.match_dir={tmp_path / 'sweep'}"], "x")


def test_post_training_sweeps_each_criterion_and_bmrs_stops_at_its_delta_f_set(tmp_path):
    record = run(tmp_path, ["pruner=bmrs_post", *PRUNES, "pruner.points=5",
                            "pruner.criteria=[snr,l2,bmrs_n]"])
    assert record["status"] == "done"
    prune = next(h for h in record["history"] if h["phase"] == "prune")
    sweep = prune["sweep"]
    assert [p["criterion"] for p in sweep] == ["snr"] * 5 + ["l2"] * 5 + ["bmrs_n"] * 5
    for crit in ("snr", "l2"):
        pts = [p for p in sweep if p["criterion"] == crit]
        assert [p["units_pruned"] for p in pts] == [0, 9, 18, 27, 36]
        assert not any(p["stop"] for p in pts)
    bm = [p for p in sweep if p["criterion"] == "bmrs_n"]
    stop = prune["stops"]["bmrs_n"]
    assert all(p["units_pruned"] <= stop["units_pruned"] for p in bm)
    assert [p["stop"] for p in bm][-1] and bm[-1]["units_pruned"] == stop["units_pruned"]
    # the run ends with BMRS_N's stopping point, cut
    assert record["final"]["unit_compression"] == pytest.approx(stop["unit_compression"])
    assert prune["test_acc"] == pytest.approx(stop["test_acc"])


def test_every_noise_pruner_trains_on_synthetic_cifar10_shapes(tmp_path):
    for pruner in ("bmrs_u4", "snr", "e_theta"):
        record = run(tmp_path, [f"pruner={pruner}", "model=lenet5", "dataset=synthetic_cifar10",
                                "dataset.shape=[3,32,32]", "dataset.n_train=256", "dataset.n_test=64",
                                "trainer.epochs=1", "pruner.finetune_epochs=1"], pruner)
        assert record["status"] == "done"
        assert record["final"]["units_dense"] == {"0": 18, "4": 48, "9": 360, "12": 252}


def test_resize_and_validation_split_are_applied_before_training():
    cfg = config([*MLP, "pruner=bmrs_none", "dataset.shape=[1,28,28]", "dataset.resize=32",
                  "dataset.val_fraction=0.25"])
    data = load_data(cfg.dataset, cfg.paths.data_dir, torch.device("cpu"))
    assert data.input_shape == (1, 32, 32) == input_shape(cfg.dataset)[0]
    assert len(data.x_val) == 80 and len(data.x_train) == 240 and len(data.x_test) == 128


@needs_mnist
def test_mnist_is_resized_and_normalised_as_the_authors_do():
    cfg = validate(compose_cfg(["experiment=bmrs_mnist_mlp", f"paths.data_dir={mnist_root()}",
                                "pruner=bmrs_none"]))
    data = load_data(cfg.dataset, cfg.paths.data_dir, torch.device("cpu"))
    assert data.x_train.shape[1:] == (1, 32, 32) and len(data.x_train) == 48_000
    assert len(data.x_val) == 12_000 and len(data.x_test) == 10_000
    background = data.x_train[:, :, 0, 0]  # black pixels: (0 - 127) / 255
    assert torch.allclose(background, torch.tensor(-127 / 255), atol=1e-5)


def test_metrics_json_of_a_noise_run_names_its_kernel_and_both_compressions(tmp_path):
    run(tmp_path, ["pruner=e_theta", *MLP, "trainer.epochs=1", "pruner.finetune_epochs=1"])
    final = json.loads((tmp_path / "run" / METRICS).read_text())["final"]
    for key in ("unit_compression", "param_compression", "params_removed", "kernel", "macs_nonzero"):
        assert key in final


def test_the_benchmarked_export_is_smaller_than_the_dense_network_and_gives_the_final_outputs(tmp_path):
    from bayes_prune.bench_bmrs import bench_cut

    run(tmp_path, ["pruner=bmrs_n", *PRUNES, "pruner.finetune_epochs=1"])
    row = bench_cut([tmp_path / "run"], batches=[1, 8], repeats=2)[0]
    assert row["export_vs_final_max_abs_diff"] < 1e-5
    assert row["params_cut"] < row["params_dense"] and row["bytes_cut"] < row["bytes_dense"]
    assert row["macs_cut"] < row["macs_dense"] and set(row["latency"]) == {1, 8}


@needs_mnist
def test_the_overhead_bench_times_sampling_against_a_learned_scale_floor(monkeypatch):
    from bayes_prune.bench_bmrs import _scale_forward, bench_overhead, block_state
    from bayes_prune.bmrs_layers import noise_layers

    monkeypatch.setenv("BAYES_PRUNE_DATA", str(mnist_root()))
    subset = ["dataset.train_subset=256", "dataset.test_subset=64"]
    row = bench_overhead(["fashion_mnist_mlp"], 1, ["c", "scale"], subset)[0]
    assert set(row["median_seconds"]) == {"none", "bmrs_n[c]", "bmrs_n[scale]"}
    assert set(row["overhead"]) == {"bmrs_n[c]", "bmrs_n[scale]"} and row["n_train"] == 256
    # the floor multiplies by a learned per-unit scale: deterministic, unlike the sampling layer
    state = block_state("fashion_mnist_mlp", "bmrs_n", subset)
    layer = next(iter(noise_layers(state.model).values()))
    x = torch.ones(4, layer.mu.numel())
    assert not torch.equal(layer(x), layer(x))
    layer.forward = _scale_forward(layer)
    assert torch.equal(layer(x), x * layer.mu.exp())
