"""Fleets: many runs trained as one stacked network, each member equal to its single run."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg, strip_timings, train_cmd
from hydra.core.config_store import ConfigStore
from torch import nn

from bayes_prune.config import Config, MethodConfig, register_configs, validate
from bayes_prune.devices import auto_device
from bayes_prune.experiment import JobContext, run_experiment
from bayes_prune.fleet import Fleet, fleet_problem
from bayes_prune.methods import Method, register_method
from bayes_prune.methods.bayes_factor import MagnitudeConfig, MagnitudePruning
from bayes_prune.models import CNNConfig, build_cnn
from bayes_prune.stacked import Form, StackedNet

TINY = ["dataset=digits", "model.hidden=[64,64]", "trainer.epochs=3", "trainer.threads=1",
        "trainer.progress=off"]
GRID = [[f"pruner={p}", f"sparsity.percent={s}", f"seed={seed}"]
        for p in ("random", "magnitude", "bayes_magnitude") for s in (50, 90) for seed in (0, 1)]


@dataclass
class NanAtConfig(MagnitudeConfig):
    name: str = "nan_at"
    method: str = "nan_at"
    nan_seed: int = 1  # the run with this seed sets its weights to NaN after its first epoch


@register_method("nan_at")
class NanAt(MagnitudePruning):
    """Magnitude pruning, except that one seed's run diverges."""

    config = NanAtConfig

    def epoch_end(self, run, epoch):
        fields = super().epoch_end(run, epoch)
        if self.run_cfg.seed == self.cfg.nan_seed:
            with torch.no_grad():
                next(run.model.parameters()).fill_(math.nan)
        return fields


@dataclass
class UnstackableConfig(MethodConfig):
    name: str = "unstackable"
    method: str = "unstackable"


@register_method("unstackable")
class Unstackable(Method):
    """A method of another family: it trains, but not as a fleet member."""

    config = UnstackableConfig


ConfigStore.instance().store(group="pruner", name="nan_at", node=NanAtConfig)
ConfigStore.instance().store(group="pruner", name="unstackable", node=UnstackableConfig)
register_configs()


@functools.cache
def config(overrides: tuple[str, ...]) -> Config:
    return validate(compose_cfg(TINY + list(overrides)))


def singles(root: Path, grid: list[list[str]], extra: list[str]) -> list[dict]:
    return [run_experiment(copy.deepcopy(config((*extra, *o))),
                           JobContext(run_dir=root / "single" / str(i), overrides=o))
            for i, o in enumerate(grid)]


def fleet(root: Path, grid: list[list[str]], extra: list[str]) -> list[dict]:
    jobs = [(copy.deepcopy(config((*extra, *o))),
             JobContext(run_dir=root / "fleet" / str(i), overrides=o, multirun=True))
            for i, o in enumerate(grid)]
    outcomes = Fleet(jobs, auto_device()).run()  # where the single runs train: CUDA if there is one
    assert [o.error for o in outcomes if not isinstance(o.error, FloatingPointError)] == [
        None] * sum(not isinstance(o.error, FloatingPointError) for o in outcomes)
    return [json.loads((root / "fleet" / str(i) / "metrics.json").read_text()) for i in range(len(grid))]


def assert_equivalent(alone: dict, member: dict) -> None:
    """Same masks and gate decisions at every epoch; first-epoch loss within 1e-4 relative; final
    accuracy within half a point."""
    assert member["status"] == alone["status"] == "done"
    for a, m in zip(alone["history"], member["history"], strict=True):
        assert (a["sparsity_per_layer"], a["gate_open"], a["pruned"]) == (
            m["sparsity_per_layer"], m["gate_open"], m["pruned"])
    first_a, first_m = alone["history"][0]["train_loss"], member["history"][0]["train_loss"]
    assert abs(first_m - first_a) <= 1e-4 * abs(first_a)
    assert abs(member["final"]["test_acc"] - alone["final"]["test_acc"]) <= 0.005
    assert member["final"]["sparsity_per_layer"] == alone["final"]["sparsity_per_layer"]
    assert strip_timings(member).keys() == strip_timings(alone).keys()
    assert member["history"][0].keys() == alone["history"][0].keys()


def test_a_fleet_gives_every_member_its_single_runs_masks_gates_loss_and_accuracy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bayes_prune")
    alone = singles(tmp_path, GRID, [])
    members = fleet(tmp_path, GRID, [])
    for a, m in zip(alone, members, strict=True):
        assert_equivalent(a, m)
    # the grid's cells differ from each other, so the comparison above is not vacuous
    assert len({m["final"]["test_acc"] for m in members}) > 6
    per_layer = members[GRID.index(["pruner=magnitude", "sparsity.percent=90", "seed=0"])]["final"]
    assert all(abs(v - 0.9) < 1e-3 for v in per_layer["sparsity_per_layer"].values())
    # each member owns its directory as a single run does: checkpoint, weights, masks, logs
    for i in range(len(GRID)):
        run_dir = tmp_path / "fleet" / str(i)
        assert all((run_dir / f).exists() for f in ("checkpoint.pt", "model.pt", "masks.pt", "train.log"))
        log = (run_dir / "train.log").read_text()
        assert log.count("train epoch") == 3 and log.count("run dir:") == 1  # its own lines only


def test_a_cnn_fleet_stacks_grouped_convolutions_equivalently(tmp_path):
    grid = [[f"pruner={p}", "sparsity.percent=90", f"seed={seed}"]
            for p in ("random", "bayes_magnitude") for seed in (0, 1)]
    extra = ["model=cnn", "model.channels=[4,8]", "model.hidden=[32]", "trainer.epochs=2"]
    for a, m in zip(singles(tmp_path, grid, extra), fleet(tmp_path, grid, extra), strict=True):
        assert_equivalent(a, m)


def test_a_diverging_member_is_marked_diverged_and_the_others_finish_as_alone(tmp_path):
    grid = [["pruner=nan_at", "seed=1"], ["pruner=nan_at", "seed=0"], ["pruner=magnitude", "seed=2"]]
    extra = ["sparsity.percent=50"]
    members = fleet(tmp_path, grid, extra)
    assert [m["status"] for m in members] == ["diverged", "done", "done"]
    assert members[0]["error"]["type"] == "Diverged" and len(members[0]["history"]) == 1
    alone = singles(tmp_path, grid[1:], extra)
    for a, m in zip(alone, members[1:], strict=True):
        assert_equivalent(a, m)
        for ha, hm in zip(a["history"], m["history"], strict=True):  # untouched by the NaN member
            assert hm["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-4)


def test_only_paper_000_runs_of_stackable_networks_join_a_fleet():
    assert fleet_problem(validate(compose_cfg(TINY + ["pruner=bayes_random"]))) is None
    assert "cannot be stacked" in fleet_problem(validate(compose_cfg(TINY + ["pruner=unstackable"])))


def test_the_stacked_network_computes_every_members_own_outputs():
    torch.manual_seed(0)
    cfg = CNNConfig(channels=[3, 5], hidden=[7])
    models = [build_cnn(cfg, (2, 8, 8), 4) for _ in range(3)]
    net = StackedNet(models[0])
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    x = torch.randn(5, 2, 8, 8)
    alone = torch.stack([m(x) for m in models])
    assert torch.allclose(net(params, x, Form.shared), alone, atol=1e-5)
    per_member = torch.randn(3, 5, 2, 8, 8)
    assert torch.allclose(net(params, per_member, Form.batched),
                          torch.stack([m(xm) for m, xm in zip(models, per_member, strict=True)]), atol=1e-5)
    data = torch.randn(20, 2, 8, 8)
    idx = torch.randint(20, (3, 5))
    gathered = net(params, net.gather(data, idx), net.input_form)
    assert torch.allclose(gathered, torch.stack([m(data[i]) for m, i in zip(models, idx, strict=True)]),
                          atol=1e-5)
    assert isinstance(models[0][0], nn.Conv2d) and net.input_form is Form.grouped


# -- through the command line -------------------------------------------------------------------

CLI = ["dataset=digits", "model.hidden=[32]", "trainer.threads=1", "hydra/launcher=fleet"]


def fleet_sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd("-m", *CLI, f"paths.output_dir={out}", *args), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def records(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.rglob("metrics.json"))}


def test_a_fleet_sweep_killed_midway_loses_no_finished_member_and_resumes_the_rest(tmp_path):
    grid = {"pruner": ("magnitude", "bayes_random"), "seed": ("0", "1"), "trainer.lr": ("0.001", "0.002")}
    args = ["name=kill", "trainer.epochs=5", "sparsity.percent=50",
            *(f"{k}={','.join(v)}" for k, v in grid.items())]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd("-m", *CLI, f"paths.output_dir={killed}", *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # the first fleet (lr 0.001) is done, the second one under way
        found = records(killed).values()
        if sum(r.get("status") == "done" for r in found) == 4 and sum(
                r.get("status") == "running" and len(r.get("history") or []) >= 1 for r in found) == 4:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records(killed)
    finished = {k for k, r in before.items() if r["status"] == "done"}
    assert len(finished) == 4 and len(before) == 8, {k: r["status"] for k, r in before.items()}

    again = fleet_sweep(killed, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    after = records(killed)
    assert all(r["status"] == "done" for r in after.values()) and len(after) == 8
    for k in finished:  # skipped: the record is the one written before the kill
        assert after[k]["updated_at"] == before[k]["updated_at"] and not after[k]["resumes"]
    assert sum(bool(r["resumes"]) for r in after.values()) == 4
    for k in after:  # each member logged its own lines, once per epoch it trained
        log = (killed / k / "train.log").read_text()
        assert sum(f"train epoch {e}/5" in log for e in range(1, 6)) == 5 and log.count("done:") == 1
    # a resumed fleet continues where it stopped: an uninterrupted fleet gives the same decisions
    # and numbers (to the last bits: matrix products are blocked by the number of members, and a
    # kill between two members' checkpoints splits the fleet into two at the resume)
    for lr in grid["trainer.lr"]:
        names = {f"{p},{s}": (p, s) for p in grid["pruner"] for s in grid["seed"]}
        jobs = [(validate(compose_cfg([*CLI[:3], "trainer.epochs=5", "sparsity.percent=50",
                                       f"trainer.lr={lr}", f"pruner={p}",
                                       f"seed={s}", "trainer.progress=off"])),
                 JobContext(run_dir=tmp_path / "reference" / lr / n, overrides=[]))
                for n, (p, s) in names.items()]
        Fleet(jobs, auto_device()).run()
        for n, (p, s) in names.items():
            ref = json.loads((tmp_path / "reference" / lr / n / "metrics.json").read_text())
            ours = next(r for r in after.values() if r["config"]["trainer"]["lr"] == float(lr)
                        and r["config"]["pruner"]["name"] == p and r["seed"] == int(s))
            for a, b in zip(strip_timings(ours["history"]), strip_timings(ref["history"]), strict=True):
                exact = [k for k, v in b.items() if not isinstance(v, float)]
                assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
                assert {k: v for k, v in a.items() if k not in exact} == pytest.approx(
                    {k: v for k, v in b.items() if k not in exact}, rel=1e-7)
            assert ours["final"]["test_acc"] == pytest.approx(ref["final"]["test_acc"], abs=1e-9)


def test_a_sweep_spreads_its_fleets_over_devices_and_runs_refused_jobs_alone(tmp_path):
    proc = fleet_sweep(tmp_path, "name=mixed", "trainer.epochs=1", "pruner=none,magnitude",
                       "sparsity.percent=50,100", "trainer.lr=0.001,0.002",
                       "hydra.launcher.devices=[cpu,cpu]")
    assert proc.returncode != 0  # the refused jobs fail the sweep at its end, as with any launcher
    found = records(tmp_path)
    done = [r for r in found.values() if r["status"] == "done"]
    assert len(done) == 4 and {r["threads"] for r in done} == {1}  # 2 cores, 2 worker processes
    assert len({r["config"]["trainer"]["lr"] for r in done}) == 2
    pids = {line.split("pid=")[1].split()[0] for line in proc.stdout.splitlines()
            if "pid=" in line and "/sparsity=100/" not in line}
    assert len(pids) == 2  # one worker process per device entry, each training one fleet
    assert proc.stdout.count("runs as a single run: its config is refused") == 4
    assert [r["status"] for r in found.values() if r["status"] != "done"] == ["failed"] * 2


def test_jobs_are_grouped_into_fleets_by_everything_but_pruner_sparsity_and_seed(tmp_path):
    from hydra.core.utils import JobReturn

    from bayes_prune.launcher import FleetLauncher, _Job

    def job(num: int, *overrides: str, run_dir: str | None = None) -> _Job:
        cfg = config(overrides)
        path = tmp_path / (run_dir or str(num))
        return _Job(num, None, JobReturn(), cfg, JobContext(run_dir=path, overrides=list(overrides)))

    jobs = [job(0, "pruner=magnitude", "seed=0"), job(1, "pruner=random", "sparsity.percent=90", "seed=1"),
            job(2, "trainer.lr=0.01"), job(3, "model.hidden=[16]"), job(4, "pruner=none", "seed=2"),
            job(5, "pruner=none", "seed=2", run_dir="4"), job(6, "trainer.device=cpu")]
    launcher = FleetLauncher(devices=["cpu", "cpu"], max_members=2)
    plan, singles = launcher._plan(jobs)
    fleets = sorted(sorted(j.num for j in f) for _, fs in plan for f in fs)
    assert fleets == [[0, 1], [2], [3], [4], [6]]  # 0, 1, 4 share a key; max_members splits them
    assert [j.num for j in singles] == [5] and "job #4's" in singles[0].single
    assert [len(fs) for _, fs in plan] == [3, 2] or [len(fs) for _, fs in plan] == [2, 3]
