"""Mask computation, the shared mask mechanism, schedules and gates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayes_prune.masks import GradMasker, apply_masks, layer_sparsity, weight_masks, zero_optimizer_state
from bayes_prune.methods.bayes_factor import (
    Gate,
    GatedConfig,
    Schedule,
    gate_open,
    layer_target,
    magnitude_mask,
    random_mask,
    scheduled_rate,
)
from bayes_prune.models import prunable_layers


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 17), nn.ReLU(), nn.Linear(17, 13), nn.ReLU(),
                         nn.Linear(13, 3))


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_per_layer_sparsity_is_floor_rn_over_n_and_survives_adam_steps(rate, method):
    net = small_net()
    layers = prunable_layers(net, prune_output=False)
    gen = torch.Generator().manual_seed(0)
    propose = {"random": lambda w: random_mask(w, rate, gen), "magnitude": lambda w: magnitude_mask(w, rate)}
    masks = {f"{n}.weight": propose[method](m.weight) for n, m in layers.items()}
    assert set(masks) == set(weight_masks(layers))
    apply_masks(net, masks)
    expected = {n: math.floor(rate * m.weight.numel()) / m.weight.numel() for n, m in layers.items()}
    assert layer_sparsity(layers) == pytest.approx(expected, abs=0)

    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
    masker = GradMasker(net, masks)
    x, y = torch.randn(64, 20), torch.randint(3, (64,))
    for step in range(20):
        if step == 10:  # state accumulated before a prune must not revive pruned weights either
            zero_optimizer_state(opt, net, masks)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        masker()
        opt.step()
    assert layer_sparsity(layers) == pytest.approx(expected, abs=0)
    for n, m in layers.items():
        assert torch.all(m.weight[~masks[f"{n}.weight"]] == 0)
        assert torch.all(opt.state[m.weight]["exp_avg"][~masks[f"{n}.weight"]] == 0)


def test_output_layer_is_spared_unless_asked():
    net = small_net()
    assert list(prunable_layers(net, prune_output=False)) == ["1", "3"]
    assert list(prunable_layers(net, prune_output=True)) == ["1", "3", "5"]


def test_random_pruning_is_reproducible_by_seed_and_differs_across_seeds():
    w = torch.randn(50, 40)
    a = random_mask(w, 0.5, torch.Generator().manual_seed(1))
    b = random_mask(w, 0.5, torch.Generator().manual_seed(1))
    c = random_mask(w, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_pruning_tops_up_counting_existing_zeros():
    w = torch.randn(10, 10)
    w[0, :] = 0  # 10 zeros already
    mask = random_mask(w, 0.25, torch.Generator().manual_seed(0))
    assert int((~mask).sum()) == 25
    assert not mask[0].any()  # existing zeros stay pruned; only 15 new ones were drawn


def test_magnitude_prunes_exactly_the_smallest_abs_weights():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.05, -0.7], [1.0, -0.3, 0.2]])
    mask = magnitude_mask(w, 0.5)  # floor(4.5) = 4 smallest |w|: 0.05, -0.1, 0.2, -0.3
    expected = torch.tensor([[True, False, True], [True, False, True], [True, False, False]])
    assert torch.equal(mask, expected)


def test_magnitude_breaks_ties_by_flat_index():
    mask = magnitude_mask(torch.ones(2, 3), 0.5)
    assert torch.equal(mask.flatten(), torch.tensor([False, False, False, True, True, True]))


def test_layer_target_floors():
    assert [layer_target(10, r) for r in (0.25, 0.5, 0.99)] == [2, 5, 9]
    assert layer_target(100, 0.29) == 29  # no float undershoot (0.29 * 100 = 28.999...)


def test_gradual_schedule_is_a_cubic_ramp_reaching_the_target():
    cfg = GatedConfig(schedule=Schedule.gradual, ramp_start=2, ramp_epochs=4)
    rates = [scheduled_rate(cfg, 0.9, e) for e in range(1, 8)]
    assert rates[0] == 0.0
    assert rates[1] == pytest.approx(0.9 * (1 - 0.75**3))
    assert rates[4:] == [0.9, 0.9, 0.9]
    assert all(a <= b for a, b in zip(rates[:-1], rates[1:], strict=True))
    assert scheduled_rate(GatedConfig(), 0.9, 1) == 0.9


def test_gates_decide_as_specified():
    # lagged: previous epoch's log BF; +inf before the first epoch makes the first prune unconditional
    assert gate_open(Gate.lagged, log_bf=-1e5, prev_log_bf=math.inf, beta=1.0)
    assert not gate_open(Gate.lagged, log_bf=+50.0, prev_log_bf=-3.0, beta=1.0)
    assert gate_open(Gate.lagged, log_bf=-50.0, prev_log_bf=2.0, beta=1.0)
    # tentative: this candidate's own log BF
    assert not gate_open(Gate.tentative, log_bf=-1e5, prev_log_bf=math.inf, beta=1.0)
    assert gate_open(Gate.tentative, log_bf=0.5, prev_log_bf=-9.0, beta=1.0)
    # beta: compared in the log domain, strictly
    assert not gate_open(Gate.tentative, log_bf=math.log(10.0), prev_log_bf=0, beta=10.0)
    assert gate_open(Gate.tentative, log_bf=-5.0, prev_log_bf=0, beta=math.exp(-10))
    # none: always open
    assert gate_open(Gate.none, log_bf=-1e9, prev_log_bf=-1e9, beta=1.0)


def test_progress_bars_only_on_a_terminal_outside_multirun(monkeypatch):
    import sys

    from bayes_prune.config import Progress
    from bayes_prune.progress import use_bars

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert use_bars(Progress.auto, multirun=False)
    assert not use_bars(Progress.auto, multirun=True)
    assert use_bars(Progress.on, multirun=True) and not use_bars(Progress.off, multirun=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not use_bars(Progress.auto, multirun=False)
