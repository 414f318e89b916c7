"""Log prior, log likelihood and the log Bayes factor against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Laplace, Normal

from bayes_prune.config import PriorConfig, PriorName
from bayes_prune.evidence import Evidence, add_prior_grad_, evaluate, log_prior
from bayes_prune.masks import apply_masks, changes_weights
from bayes_prune.methods.bayes_factor import magnitude_mask
from bayes_prune.models import prunable_layers, weight_layers


def f64(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_gaussian_log_prior_matches_torch_distributions():
    ws = [torch.randn(7, 5), torch.randn(3, 7)]
    prior = PriorConfig(name=PriorName.gaussian, sigma=0.3)
    direct = sum(Normal(f64(0.0), f64(0.3)).log_prob(w.double()).sum().item() for w in ws)
    assert log_prior(ws, prior) == pytest.approx(direct, rel=1e-12)


def test_laplace_log_prior_matches_torch_distributions():
    ws = [torch.randn(7, 5), torch.randn(3, 7)]
    prior = PriorConfig(name=PriorName.laplace, scale=0.7)
    direct = sum(Laplace(f64(0.0), f64(0.7)).log_prob(w.double()).sum().item() for w in ws)
    assert log_prior(ws, prior) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("name", [PriorName.gaussian, PriorName.laplace])
def test_prior_gradient_is_the_gradient_of_minus_log_prior_over_n(name):
    prior = PriorConfig(name=name, sigma=0.5, scale=0.5)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (-log_prior_autograd(w, prior) / 100).backward()
    expected = w.grad.clone()
    w.grad.zero_()
    add_prior_grad_([w], prior, n_train=100)
    assert torch.allclose(w.grad, expected)


def log_prior_autograd(w, prior):
    dist = Normal(0.0, prior.sigma) if prior.name is PriorName.gaussian else Laplace(0.0, prior.scale)
    return dist.log_prob(w).sum()


def tiny_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(500, 6), torch.randint(3, (500,))
    return net, x, y


def test_log_bayes_factor_matches_a_direct_computation():
    net, x, y = tiny_problem()
    prior = PriorConfig(sigma=0.5)
    weights = [m.weight for m in weight_layers(net).values()]
    layers = prunable_layers(net, prune_output=False)
    ev = Evidence(x, y, batch_size=64, subsample=None, seed=0)

    def direct_lp() -> float:
        with torch.no_grad():
            ll = -nn.functional.cross_entropy(net(x).double(), y, reduction="sum").item()
        lp = sum(Normal(f64(0.0), f64(0.5)).log_prob(w.detach().double()).sum().item() for w in weights)
        return ll + lp

    before_direct = direct_lp()
    before = ev.log_likelihood(net) + log_prior(weights, prior)
    cand = {f"{n}.weight": magnitude_mask(m.weight, 0.5) for n, m in layers.items()}
    zeroed_sq = sum(float(m.weight.detach()[~cand[f"{n}.weight"]].double().square().sum())
                    for n, m in layers.items())
    ce_before = -ev.log_likelihood(net)
    apply_masks(net, cand)
    after = ev.log_likelihood(net) + log_prior(weights, prior)
    log_bf = after - before
    assert before == pytest.approx(before_direct, rel=1e-12)
    assert log_bf == pytest.approx(direct_lp() - before_direct, rel=1e-9, abs=1e-9)
    # methods.md §1.1 closed form: -(CE_after - CE_before) + sum of newly zeroed w^2 / (2 sigma^2)
    closed = -(-ev.log_likelihood(net) - ce_before) + zeroed_sq / (2 * 0.5**2)
    assert log_bf == pytest.approx(closed, rel=1e-9)


def test_evaluate_sums_cross_entropy_and_counts_correct_independent_of_batch_size():
    net, x, y = tiny_problem()
    ce1, c1 = evaluate(net, x, y, 7)
    ce2, c2 = evaluate(net, x, y, 500)
    assert ce1 == pytest.approx(ce2, rel=1e-6) and c1 == c2  # float32 logits differ in the last bits
    assert c1 == int((net(x).argmax(1) == y).sum())


def test_subsampled_evidence_is_scaled_to_the_full_set_and_fixed():
    net, x, y = tiny_problem()
    full = Evidence(x, y, 64, None, 0).log_likelihood(net)
    sub = Evidence(x, y, 64, 250, 0)
    assert sub.scale == 2.0 and len(sub.x) == 250
    assert sub.log_likelihood(net) == sub.log_likelihood(net)
    assert sub.log_likelihood(net) == pytest.approx(full, rel=0.2)


def test_a_candidate_equal_to_the_current_mask_changes_no_weight():
    net, _, _ = tiny_problem()
    layers = prunable_layers(net, prune_output=False)
    cand = {f"{n}.weight": magnitude_mask(m.weight, 0.5) for n, m in layers.items()}
    assert changes_weights(net, cand)
    apply_masks(net, cand)
    again = {f"{n}.weight": magnitude_mask(m.weight, 0.5) for n, m in layers.items()}
    assert not changes_weights(net, again)
