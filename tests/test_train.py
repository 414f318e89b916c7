"""End-to-end runs of one experiment, in-process (fast) and through the real CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, compose_cfg, mnist_root, needs_mnist, strip_timings, train_cmd

from bayes_prune.config import validate
from bayes_prune.devices import auto_device
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.models import build_model
from bayes_prune.record import CHECKPOINT, MASKS, METRICS, WEIGHTS
from bayes_prune.run import load_model

TINY = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.n_train=256", "dataset.n_test=128",
        "model.hidden=[32,32]", "trainer.epochs=3", "trainer.progress=off"]
MODELS = {"fcn": ["model=fcn"], "cnn": ["model=cnn", "model.channels=[4,8]"]}
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_loss_before_prune",
                "test_acc_before_prune", "log_prior", "log_likelihood", "log_bf", "gate_open", "pruned",
                "target_sparsity", "sparsity", "sparsity_per_layer", "seconds", "evidence_seconds",
                "phase", "cycle"}
FINAL_KEYS = {"test_acc", "test_loss", "sparsity", "sparsity_per_layer", "params_total", "params_nonzero",
              "params_dense", "compression", "wall_seconds", "macs_dense", "macs_nonzero",
              "epoch_target_reached", "units_removed", "architecture"}


def run(tmp_path, overrides: list[str], name: str = "run") -> dict:
    cfg = compose_cfg(TINY + overrides)
    job = JobContext(run_dir=tmp_path / name, overrides=overrides)
    return run_experiment(validate(cfg), job)


@pytest.mark.parametrize("model", ["fcn", "cnn"])
def test_run_writes_complete_metrics_and_a_loadable_state_dict(tmp_path, model):
    record = run(tmp_path, [*MODELS[model], "pruner=bayes_magnitude", "sparsity='75'"])
    on_disk = json.loads((tmp_path / "run" / METRICS).read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["schema_version"] == 2 and on_disk["status"] == "done" and on_disk["error"] is None
    assert on_disk["config"]["pruner"]["gate"] == "lagged" and on_disk["seed"] == 0
    assert {"torch", "python", "bayes_prune"} <= set(on_disk["versions"])
    assert on_disk["device"] == str(auto_device())
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2, 3]
    assert all(HISTORY_KEYS <= set(h) for h in on_disk["history"])
    final = on_disk["final"]
    assert FINAL_KEYS <= set(final)
    assert final["compression"] == pytest.approx(final["params_dense"] / final["params_nonzero"])
    assert final["params_dense"] == final["params_total"]  # masked, not cut

    cfg = validate(compose_cfg(TINY + MODELS[model]))
    fresh = build_model(cfg.model, (1, 8, 8), 10)
    fresh.load_state_dict(torch.load(tmp_path / "run" / WEIGHTS, weights_only=True))
    assert str(load_model(tmp_path / "run")) == str(fresh)
    masks = torch.load(tmp_path / "run" / MASKS, weights_only=True)
    layers = dict(fresh.named_modules())
    for name, per_layer in final["sparsity_per_layer"].items():
        w = layers[name].weight
        n = w.numel()
        assert per_layer == (n * 3 // 4) / n  # floor(0.75 n) / n, measured from the loaded weights
        assert float((w == 0).sum()) / n == per_layer
        assert torch.all(w[~masks[f"{name}.weight"]] == 0)
    assert (tmp_path / "run" / CHECKPOINT).exists()


def test_same_seed_twice_gives_identical_metrics_except_timings(tmp_path):
    a = run(tmp_path, ["pruner=random", "sparsity='50'", "seed=3"], "a")
    b = run(tmp_path, ["pruner=random", "sparsity='50'", "seed=3"], "b")
    c = run(tmp_path, ["pruner=random", "sparsity='50'", "seed=4"], "c")
    assert strip_timings(a) == strip_timings(b)
    assert a["final"]["test_loss"] != c["final"]["test_loss"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = run(tmp_path, ["pruner=bayes_random", "sparsity='90'"], "full")
    cut = run(tmp_path, ["pruner=bayes_random", "sparsity='90'", "trainer.epochs=2"], "cut")
    assert cut["status"] == "done"
    # Pretend the 2-epoch run was interrupted after epoch 2 of 3: drop its "done" and resume with 3.
    meta = json.loads((tmp_path / "cut" / METRICS).read_text())
    meta["status"] = "running"
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)
    ckpt["config"]["trainer"]["epochs"] = 3
    ckpt["run"]["position"] = {"cycle": 1, "phase": 0, "epoch": 2}
    meta["config"]["trainer"]["epochs"] = 3
    torch.save(ckpt, tmp_path / "cut" / CHECKPOINT)
    (tmp_path / "cut" / METRICS).write_text(json.dumps(meta))
    resumed = run(tmp_path, ["pruner=bayes_random", "sparsity='90'"], "cut")
    assert strip_timings(resumed["history"]) == strip_timings(full["history"])
    assert strip_timings(resumed["final"]) == strip_timings(full["final"])


def test_done_run_is_skipped_and_a_different_config_in_its_dir_is_refused(tmp_path):
    first = run(tmp_path, ["pruner=magnitude", "sparsity='50'"])
    again = run(tmp_path, ["pruner=magnitude", "sparsity='50'"])
    assert again["updated_at"] == first["updated_at"]
    with pytest.raises(ValueError, match="different config"):
        run(tmp_path, ["pruner=magnitude", "sparsity='90'"])


def test_lagged_gate_prunes_first_then_follows_previous_log_bf(tmp_path):
    record = run(tmp_path, ["pruner=bayes_random", "sparsity='50'", "pruner.schedule=gradual",
                            "pruner.ramp_epochs=3", "trainer.epochs=4"])
    hist = record["history"]
    assert hist[0]["gate_open"] and hist[0]["pruned"]
    for prev, cur in zip(hist[:-1], hist[1:], strict=True):
        assert cur["gate_open"] == (prev["log_bf"] > 0.0)
        if not cur["gate_open"]:  # a closed gate leaves the weights as they were
            assert cur["sparsity"] == prev["sparsity"]
            assert cur["test_acc"] == cur["test_acc_before_prune"]


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_lagged_oneshot_bayes_arm_equals_its_baseline_run_for_run(tmp_path, method):
    # The replication reading (methods.md A10, A11, §1.6): the first prune is unconditional and
    # reaches the target; every later candidate equals the mask, so log BF = 0 and the gate is moot.
    base = run(tmp_path, [f"pruner={method}", "sparsity='75'"], "base")
    bayes = run(tmp_path, [f"pruner=bayes_{method}", "sparsity='75'"], "bayes")
    assert [h["gate_open"] for h in bayes["history"]] == [True, False, False]
    assert all(h["log_bf"] == 0.0 for h in bayes["history"][1:])
    keys = ("train_loss", "test_acc", "test_loss", "log_likelihood", "log_bf", "sparsity")
    assert ([{k: h[k] for k in keys} for h in base["history"]]
            == [{k: h[k] for k in keys} for h in bayes["history"]])


def test_tentative_gate_only_applies_prunes_with_positive_log_bf(tmp_path):
    record = run(tmp_path, ["pruner=bayes_random", "pruner.gate=tentative", "sparsity='99'"])
    for h in record["history"]:
        assert h["gate_open"] == (h["log_bf"] > 0.0)
    assert not record["history"][0]["gate_open"]  # a one-shot 99 % random prune costs evidence
    assert record["final"]["sparsity"] == 0.0


def test_regrow_mask_lets_weights_regrow_and_reimposes_the_target_each_epoch(tmp_path):
    record = run(tmp_path, ["pruner=magnitude", "pruner.mask=regrow", "sparsity='50'"])
    assert all(h["pruned"] for h in record["history"])  # zeros regrew, so every epoch prunes again
    assert record["final"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_unpruned_run_logs_evidence_with_zero_log_bf(tmp_path):
    record = run(tmp_path, ["pruner=none"])
    assert all(h["log_bf"] == 0.0 and not h["pruned"] for h in record["history"])
    assert all(h["log_likelihood"] < 0 and h["log_prior"] != 0 for h in record["history"])
    assert record["final"]["sparsity"] == 0.0


def test_failed_run_records_status_and_traceback(tmp_path):
    with pytest.raises(Exception, match="not found"):
        run(tmp_path, ["dataset=mnist", f"paths.data_dir={tmp_path}/nowhere"])
    meta = json.loads((tmp_path / "run" / METRICS).read_text())
    assert meta["status"] == "failed"
    assert meta["error"]["type"] == "DataError" and "BAYES_PRUNE_DATA" in meta["error"]["message"]
    assert "Traceback" in meta["error"]["traceback"]


@needs_mnist
def test_fcn_on_real_mnist_reaches_95_percent_in_one_epoch(tmp_path):
    cfg = compose_cfg(["dataset=mnist", f"paths.data_dir={mnist_root()}", "pruner=bayes_magnitude",
                       "sparsity='50'", "trainer.epochs=1", "trainer.progress=off"])
    record = run_experiment(validate(cfg), JobContext(run_dir=tmp_path / "m", overrides=[]))
    assert record["final"]["test_acc"] > 0.95
    assert record["final"]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_cli_run_on_digits_writes_hydra_dir_log_and_metrics(tmp_path):
    proc = subprocess.run(train_cmd("dataset=digits", "pruner=bayes_magnitude", "sparsity=90",
                                    "trainer.epochs=2", f"hydra.run.dir={tmp_path}/cli"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cli"
    assert (out / ".hydra" / "config.yaml").exists() and (out / "train.log").exists()
    assert "epoch 2/2" in (out / "train.log").read_text()  # plain log lines, no bars in a pipe
    meta = json.loads((out / METRICS).read_text())
    assert meta["status"] == "done" and meta["config"]["sparsity"]["percent"] == 90.0
    assert all(v == pytest.approx(0.9, abs=0.001) for v in meta["final"]["sparsity_per_layer"].values())


def test_importing_bayes_prune_flushes_denormals_in_every_cpu_thread():
    code = ("import bayes_prune, torch; torch.set_num_threads(2); "
            "x = torch.full((4096, 64), 1e-39); print(float((x @ torch.ones(64, 64)).abs().max()), "
            "float(x[0, 0] * 1.0))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["0.0", "0.0"], out.stderr
