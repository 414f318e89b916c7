"""The method interface: a method added in one file runs every phase; units are cut exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import compose_cfg, strip_timings
from hydra.core.config_store import ConfigStore
from torch import nn

from bayes_prune.config import MethodConfig, Phase, check, register_configs, validate
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.methods import METHODS, Method, register_method
from bayes_prune.models import CNNConfig, FCNConfig, build_cnn, build_fcn
from bayes_prune.record import CHECKPOINT, METRICS
from bayes_prune.run import load_model
from bayes_prune.structure import cut, unit_layers, unit_masks, widths

# -- a toy method, complete in these lines ---------------------------------------------------------


@dataclass
class HalfUnitsConfig(MethodConfig):
    name: str = "half_units"
    method: str = "half_units"
    phases: list[Phase] = field(default_factory=lambda: [Phase.train, Phase.prune, Phase.finetune,
                                                         Phase.compress])
    finetune_epochs: int = 2
    calibration_size: int = 64
    keep: float = 0.5  # fraction of units kept per hidden layer

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.keep <= 1, "pruner.keep", self.keep, "a number in (0, 1]")


@register_method("half_units")
class HalfUnits(Method):
    """Post-training: keep the units with the largest mean |activation| on the calibration set,
    fine-tune with their masks fixed, then cut the others out."""

    config = HalfUnitsConfig
    calls: list[str] = []

    def prune(self, run, calib):
        assert len(calib.x) == self.cfg.calibration_size and len(calib.y) == len(calib.x)
        self.keep = {}
        for name, layer in unit_layers(run.model).items():
            score = layer.weight.detach().flatten(1).abs().sum(1)
            k = max(1, int(self.cfg.keep * len(score)))
            self.keep[name] = torch.zeros(len(score), dtype=torch.bool)
            self.keep[name][score.argsort(descending=True)[:k]] = True
        run.set_masks(unit_masks(run.model, self.keep, run.data.input_shape))
        return {"units_kept": {n: int(m.sum()) for n, m in self.keep.items()}}

    def compress(self, run):
        if all(bool(m.all()) for m in self.keep.values()):
            return None
        run.set_model(cut(run.model, self.keep, run.data.input_shape))
        self.keep = {n: torch.ones(w, dtype=torch.bool) for n, w in widths(run.model).items()}
        return {"cut": True}

    def state_dict(self):
        return {"keep": getattr(self, "keep", {})}

    def load_state_dict(self, state):
        self.keep = state["keep"]


ConfigStore.instance().store(group="pruner", name="half_units", node=HalfUnitsConfig)
register_configs()

# ---------------------------------------------------------------------------------------------

TINY = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.n_train=256", "dataset.n_test=128",
        "model.hidden=[32,16]", "trainer.epochs=2", "trainer.progress=off"]


def run(tmp_path, overrides, name="run"):
    cfg = validate(compose_cfg(TINY + overrides))
    return run_experiment(cfg, JobContext(run_dir=tmp_path / name, overrides=overrides))


def test_a_method_in_one_file_runs_train_prune_finetune_and_compress(tmp_path):
    record = run(tmp_path, ["pruner=half_units"])
    assert record["status"] == "done"
    phases = [(h["phase"], h["epoch"]) for h in record["history"]]
    assert phases == [("train", 1), ("train", 2), ("prune", None), ("finetune", 1), ("finetune", 2),
                      ("compress", None)]
    prune = record["history"][2]
    assert prune["units_kept"] == {"1": 16, "3": 8}
    final = record["final"]
    # sizes against the dense reference: 64-32-16-10 dense, 64-16-8-10 after the cut
    dense = 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    cut_size = 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert final["params_dense"] == dense and final["params_total"] == cut_size
    assert final["compression"] == pytest.approx(dense / final["params_nonzero"])
    assert final["units_removed"] == {"1": 16, "3": 8} and final["architecture"]["widths"] == {
        "1": 16, "3": 8}
    assert final["macs_nonzero"] < final["macs_dense"]
    assert final["sparsity_per_layer"]["1"] == pytest.approx(0.5)
    # model.pt reloads into the cut architecture and gives the recorded accuracy
    model = load_model(tmp_path / "run")
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [16, 8, 10]


def test_a_run_stopped_before_compress_resumes_there_and_equals_an_uninterrupted_run(
        tmp_path, monkeypatch):
    full = run(tmp_path, ["pruner=half_units"], "full")

    def stop(self, run_state):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(HalfUnits, "compress", stop)
        with pytest.raises(RuntimeError):
            run(tmp_path, ["pruner=half_units"], "resumed")
    stopped = json.loads((tmp_path / "resumed" / METRICS).read_text())
    assert stopped["status"] == "failed" and stopped["history"][-1]["phase"] == "finetune"
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert ckpt["run"]["position"] == {"cycle": 1, "phase": 3, "epoch": 0}
    resumed = run(tmp_path, ["pruner=half_units"], "resumed")
    assert strip_timings(resumed["history"]) == strip_timings(full["history"])
    assert strip_timings(resumed["final"]) == strip_timings(full["final"])


def test_another_methods_key_is_refused_and_the_toy_key_validated():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["pruner=magnitude", "pruner.keep=0.5"])
    assert "Key 'keep' not in 'MagnitudeConfig'" in str(err.value.__cause__)
    from bayes_prune.config import ConfigError

    with pytest.raises(ConfigError, match=r"pruner.keep=2.0: expected a number in \(0, 1\]"):
        validate(compose_cfg(["pruner=half_units", "pruner.keep=2"]))


def test_every_registered_method_has_a_pruner_option_that_composes_and_validates():
    from conftest import CONF

    options = {p.stem for p in (CONF / "pruner").glob("*.yaml")}
    options |= {n.removesuffix(".yaml") for n in ConfigStore.instance().list("pruner")}
    covered = set()
    for option in sorted(options):
        cfg = validate(compose_cfg([f"pruner={option}"]))
        assert isinstance(cfg.pruner, METHODS[cfg.pruner.method].config)
        covered.add(cfg.pruner.method)
    assert covered == set(METHODS)


# -- structure: unit masks and cuts ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fcn", "cnn"])
def test_cutting_units_out_gives_the_masked_networks_outputs(kind):
    torch.manual_seed(0)
    shape = (3, 12, 12)
    net = (build_fcn(FCNConfig(hidden=[20, 12]), shape, 5) if kind == "fcn"
           else build_cnn(CNNConfig(channels=[6, 8], hidden=[20, 12]), shape, 5))
    keep = {n: torch.rand(m.weight.shape[0]) > 0.4 for n, m in unit_layers(net).items()}
    small = cut(net, keep, shape)
    masks = unit_masks(net, keep, shape)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    x = torch.randn(7, *shape)
    assert torch.allclose(small(x), net(x), atol=1e-6)
    assert widths(small) == {n: int(k.sum()) for n, k in keep.items()}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_unit_masks_cover_row_bias_and_the_next_layers_columns_after_a_flatten():
    net = build_cnn(CNNConfig(channels=[4], hidden=[6]), (1, 4, 4), 3)  # conv -> pool -> 4*2*2 fc
    keep = {"0": torch.tensor([True, False, True, True])}
    masks = unit_masks(net, keep, (1, 4, 4))
    assert not masks["0.weight"][1].any() and masks["0.weight"][[0, 2, 3]].all()
    assert masks["0.bias"].tolist() == [True, False, True, True]
    cols = masks["4.weight"][0]  # the first FC layer sees channel 1 at flat columns 4..7
    assert cols.tolist() == [True] * 4 + [False] * 4 + [True] * 8
