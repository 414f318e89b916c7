"""Training steps replayed from CUDA graphs: the same training as eager steps, on CUDA only."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from bayes_prune.config import ConfigError, validate
from bayes_prune.cudagraph import CapturedSteps
from bayes_prune.data import load_data
from bayes_prune.experiment import JobContext, run_experiment, seed_everything
from bayes_prune.methods import method_class
from bayes_prune.run import RunState
from bayes_prune.stacked import Stack

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = ["dataset=digits", "model.hidden=[64,64]", "trainer.epochs=3", "trainer.progress=off",
        "pruner=bayes_magnitude", "sparsity.percent=90"]
MODELS = {"fcn": [], "cnn": ["model=cnn", "model.channels=[4,8]", "model.hidden=[32]"]}


def run(tmp_path, overrides: list[str], name: str) -> dict:
    cfg = validate(compose_cfg(TINY + overrides))
    return run_experiment(cfg, JobContext(run_dir=tmp_path / name, overrides=overrides))


def test_cuda_graph_on_without_cuda_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.cuda_graph=on: the run's device is cpu"):
        run(tmp_path, ["trainer.device=cpu", "trainer.cuda_graph=on"], "refused")
    assert not (tmp_path / "refused").exists()


@needs_cuda
@pytest.mark.parametrize("model", ["fcn", "cnn"])
def test_graphed_steps_train_as_eager_steps_do(tmp_path, model):
    # 1,437 training images: 22 full batches of 64 and a last one of 29, replayed from its own graph
    eager = run(tmp_path, [*MODELS[model], "trainer.device=cuda", "trainer.cuda_graph=off"], "eager")
    graph = run(tmp_path, [*MODELS[model], "trainer.device=cuda", "trainer.cuda_graph=on"], "graph")
    for e, g in zip(eager["history"], graph["history"], strict=True):
        assert (e["sparsity_per_layer"], e["gate_open"], e["pruned"]) == (
            g["sparsity_per_layer"], g["gate_open"], g["pruned"])
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
    assert abs(graph["final"]["test_acc"] - eager["final"]["test_acc"]) <= 0.005


@needs_cuda
def test_captured_steps_undo_their_warm_up():
    torch.manual_seed(0)
    device = torch.device("cuda")
    models = [nn.Linear(5, 3).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 5, device=device)
    opts = [torch.optim.Adam(m.parameters(), lr=0.1, fused=True, capturable=True) for m in models]

    def step(model, opt):
        def one(idx):
            opt.zero_grad(set_to_none=True)
            model(x[idx]).square().mean().backward()
            opt.step()
        return one

    captured = CapturedSteps(step(models[1], opts[1]), opts[1], lambda: list(models[1].parameters()))
    idx = torch.arange(4, device=device)
    for _ in range(2):
        step(models[0], opts[0])(idx)
        captured(idx)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    p = next(models[1].parameters())
    assert float(opts[1].state[p]["step"]) == 2.0  # the warm-up steps were undone


@needs_cuda
def test_a_graphed_stack_trains_as_an_eager_stack_does():
    device = torch.device("cuda")

    def runs() -> list[RunState]:
        out = []
        for seed in range(3):
            cfg = validate(compose_cfg(TINY + [f"seed={seed}", "trainer.device=cuda"]))
            method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
            seed_everything(seed)
            out.append(RunState(cfg, method, load_data(cfg.dataset, cfg.paths.data_dir, device), device))
            out[-1].method.start(out[-1])
        return out

    eager, graph = Stack(runs(), graph=False), Stack(runs(), graph=True)
    for _ in range(2):
        for (le, ae), (lg, ag) in zip(eager.train_epoch(), graph.train_epoch(), strict=True):
            assert lg == pytest.approx(le, rel=1e-5) and ag == pytest.approx(ae, abs=2e-3)
    for re, rg in zip(eager.runs, graph.runs, strict=True):
        for a, b in zip(re.model.parameters(), rg.model.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-4)
