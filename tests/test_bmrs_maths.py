"""BMRS maths (truncnorm.py) against numerical integration and Monte Carlo, and the fused CPU kernel
(bmrs_kernel.c) against the PyTorch ops it replaces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayes_prune import bmrs_kernel, truncnorm
from bayes_prune.bmrs_layers import LogUniformNoise, kl_terms

A, B = truncnorm.A, truncnorm.B
RNG = np.random.default_rng(2024)
# (mu, sigma): inside the bounds, near a, above b, wide and narrow posteriors
POSTERIORS = [(-3.0, 1.0), (-19.0, 2.0), (-0.2, 0.05), (0.3, 0.4), (-10.0, 6.0), (-20.0, 0.7),
              *[(float(RNG.uniform(-22, 1)), float(np.exp(RNG.uniform(-3, 1.5)))) for _ in range(6)]]


def t64(*xs: float) -> list[torch.Tensor]:
    return [torch.tensor(x, dtype=torch.float64) for x in xs]


def trapezoid(f, lo: float, hi: float, n: int = 400_001) -> float:
    u = np.linspace(lo, hi, n)
    return float(np.trapezoid(f(u), u))


def q_density(mu: float, sigma: float):
    from scipy.stats import truncnorm as tn

    dist = tn((A - mu) / sigma, (B - mu) / sigma, loc=mu, scale=sigma)
    return dist.pdf, dist


@pytest.mark.parametrize("mu,sigma", POSTERIORS)
def test_kl_equals_the_numerical_integral_of_q_log_q_over_p(mu, sigma):
    pdf, dist = q_density(mu, sigma)
    lo, hi = max(A, mu - 12 * sigma), min(B, mu + 12 * sigma)
    lo, hi = (lo, hi) if lo < hi else (A, B)
    if dist.cdf(lo) > 1e-12 or 1 - dist.cdf(hi) > 1e-12:
        lo, hi = A, B

    def integrand(u):
        q = pdf(u)
        return np.where(q > 0, q * (np.log(np.maximum(q, 1e-300)) + math.log(B - A)), 0.0)

    expected = trapezoid(integrand, lo, hi)
    got = float(truncnorm.kl_log_uniform(*t64(mu, sigma)))
    assert got == pytest.approx(expected, abs=2e-4 + 2e-4 * abs(expected))


def sampler_is_exact(mu: float, sigma: float) -> bool:
    """The sampler clips its CDF value to [1e-5, 1 - 1e-5] (the authors' eps): that moves visible
    mass only where Z, the posterior mass inside [a, b], is not much larger than 1e-5."""
    return float(truncnorm.log_z(*t64(mu, sigma))) > math.log(1e-2)


@pytest.mark.parametrize("mu,sigma", [p for p in POSTERIORS if sampler_is_exact(*p)])
def test_moments_and_snr_match_monte_carlo_samples_of_the_sampler(mu, sigma):
    torch.manual_seed(0)
    n = 400_000
    m, s = t64(mu, sigma)
    theta = torch.exp(truncnorm.inverse_cdf(m, s, torch.rand(n, dtype=torch.float64)))
    mean, second = float(theta.mean()), float((theta**2).mean())
    se = float(theta.std()) / math.sqrt(n)
    assert float(truncnorm.mean_theta(m, s)) == pytest.approx(mean, abs=6 * se + 1e-12)
    se2 = float((theta**2).std()) / math.sqrt(n)
    assert float(torch.exp(truncnorm.log_moment(m, s, 2))) == pytest.approx(second, abs=6 * se2 + 1e-12)
    var = second - mean**2
    # where Monte Carlo resolves the variance (not for heavy right tails, nor a near-constant theta)
    if var > 1e-4 * mean**2 and se2 / second < 2e-3:
        assert float(truncnorm.snr(m, s)) == pytest.approx(mean / math.sqrt(var), rel=0.02)


@pytest.mark.parametrize("mu,sigma", POSTERIORS[:8])
def test_moments_and_snr_equal_numerical_integrals(mu, sigma):
    pdf, _ = q_density(mu, sigma)
    m, s = t64(mu, sigma)
    moments = []
    for k in (1, 2):
        moments.append(trapezoid(lambda u, k=k: pdf(u) * np.exp(k * u), A, B, 2_000_001))
        assert float(torch.exp(truncnorm.log_moment(m, s, k))) == pytest.approx(moments[-1], rel=1e-5,
                                                                                abs=1e-12)
    var = moments[1] - moments[0] ** 2
    if var > 1e-8 * moments[0] ** 2:
        assert float(truncnorm.snr(m, s)) == pytest.approx(moments[0] / math.sqrt(var), rel=1e-3)


def integral_q_ptilde_over_p_normal(mu, sigma, m, s) -> float:
    """ln of ∫ q(u) p~(u) / p(u) du with p~ = N(m, s^2) truncated to [a, b], by the trapezoid rule
    on a grid that resolves the narrower of q and p~ (both are negligible outside it)."""
    from scipy.stats import truncnorm as tn

    ptilde = tn((A - m) / s, (B - m) / s, loc=m, scale=s)
    pdf, _ = q_density(mu, sigma)
    width = min(sigma, s)
    centre = m if s <= sigma else mu
    lo, hi = max(A, centre - 14 * width), min(B, centre + 14 * width)
    if s > sigma and not (A < mu < B):
        lo, hi = A, B
    value = trapezoid(lambda u: pdf(u) * ptilde.pdf(u) * (B - A), lo, hi, 800_001)
    return math.log(value)


NORMAL_REDUCED = [(-19.5, 0.8, A, 1e-6), (-18.0, 2.0, A, 1e-6), (-20.0, 0.3, A, 1e-6),
                  (-5.0, 3.0, -12.0, 0.5), (-1.0, 0.2, -1.3, 0.1), (-15.0, 4.0, -18.0, 2.5),
                  *[(float(RNG.uniform(-20, -1)), float(np.exp(RNG.uniform(-1, 1.2))), A, 1e-6)
                    for _ in range(3)]]


@pytest.mark.parametrize("mu,sigma,m,s", NORMAL_REDUCED)
def test_both_bmrs_n_delta_f_forms_match_the_integral_of_q_ptilde_over_p(mu, sigma, m, s):
    expected = integral_q_ptilde_over_p_normal(mu, sigma, m, s)
    mu_t, sigma_t = t64(mu, sigma)
    exact = float(truncnorm.delta_f_normal(mu_t, sigma_t, m, s, exact=True))
    coded = float(truncnorm.delta_f_normal(mu_t, sigma_t, m, s, exact=False))
    assert exact == pytest.approx(expected, abs=1e-6 + 1e-6 * abs(expected))
    # the authors' code omits the Gaussian normaliser: larger by ln(2 pi)/2 = 0.91894
    assert coded - exact == pytest.approx(0.5 * math.log(2 * math.pi), abs=1e-9)


@pytest.mark.parametrize("mu,sigma", POSTERIORS)
@pytest.mark.parametrize("p1", [8.0, 4.0])
def test_bmrs_u_delta_f_matches_the_integral_of_q_over_the_reduced_window(mu, sigma, p1):
    lo, hi = -23 * math.log(2), -p1 * math.log(2)
    pdf, dist = q_density(min(max(mu, A), B), sigma)  # ΔF_U clamps mu to [a, b] first (as coded)
    mass = float(dist.sf(lo) - dist.sf(hi)) if dist.cdf(lo) > 0.5 else float(dist.cdf(hi) - dist.cdf(lo))
    got = float(truncnorm.delta_f_uniform(*t64(mu, sigma), p1=p1))
    if mass < 1e-250:  # no mass float64 can represent: ΔF is hugely negative, the unit is kept
        assert got < -500
        return
    expected = math.log(mass * (B - A) / (hi - lo))
    assert math.log(trapezoid(pdf, lo, hi, 800_001) * (B - A) / (hi - lo)) == pytest.approx(
        expected, abs=1e-5)
    assert got == pytest.approx(expected, abs=1e-9)


def test_delta_f_is_finite_where_phi_underflows_in_the_authors_form():
    mu, sigma = t64(0.05, 0.004)  # beta = -12.5: Phi(beta) - Phi(alpha) is 0 in 0.5 (1 + erf)
    assert math.isfinite(float(truncnorm.delta_f_normal(mu, sigma)))
    assert math.isfinite(float(truncnorm.kl_log_uniform(mu, sigma)))


# -- the fused kernel --------------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(not bmrs_kernel.available(),
                                  reason=f"the C kernel did not build here: {bmrs_kernel.error()}")


@needs_kernel
@pytest.mark.parametrize("shape,last", [((64, 37), False), ((8, 6, 12, 12), True), ((8, 6, 12, 12), False)])
def test_fused_noise_equals_the_pytorch_sampler_on_the_same_uniforms_with_its_gradients(shape, last):
    torch.manual_seed(3)
    c = shape[1]
    layer = LogUniformNoise(c)
    with torch.no_grad():
        layer.mu.copy_(torch.randn(c) * 4 - 4)
        layer.logsigma.copy_(torch.randn(c) - 1)
    x = torch.randn(shape)
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    gy = torch.randn(shape)
    torch.manual_seed(11)
    y = layer(x)
    grads = torch.autograd.grad(y, (x, layer.mu, layer.logsigma), gy)
    torch.manual_seed(11)
    key = bmrs_kernel.draw_key()
    block = bmrs_kernel.to_block(x.detach(), last)[0]
    eps = bmrs_kernel.from_block(bmrs_kernel.uniforms(block.numel(), key).view(block.shape), x.shape, last)
    view = (1, c) + (1,) * (x.dim() - 2)
    x64, mu64, ls64 = (t.detach().double().requires_grad_(True) for t in (x, layer.mu, layer.logsigma))
    # the reference in float64: the kernel's quantiles are closer to it than float32 erfinv near g = 1e-5
    y_ref = x64 * torch.exp(truncnorm.inverse_cdf(mu64.view(view), truncnorm.sigma_of(ls64).view(view),
                                                  eps.double()))
    ref = torch.autograd.grad(y_ref, (x64, mu64, ls64), gy.double())
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    if last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got.double(), want, rtol=2e-3, atol=1e-4)


@needs_kernel
def test_fused_uniforms_are_uniform_and_differ_between_keys():
    u = bmrs_kernel.uniforms(200_000, 12345)
    assert 0 < float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u, bins=20, min=0, max=1) / len(u)
    assert torch.allclose(hist, torch.full((20,), 0.05), atol=0.003)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    assert not torch.equal(u[:100], bmrs_kernel.uniforms(100, 12346))


@needs_kernel
def test_fused_kl_and_its_gradient_equal_the_autograd_ones():
    torch.manual_seed(5)
    layers = [LogUniformNoise(9), LogUniformNoise(4)]
    with torch.no_grad():
        for layer in layers:
            layer.mu.copy_(torch.randn(layer.mu.shape) * 8 - 8)
            layer.logsigma.copy_(torch.randn(layer.mu.shape) * 2 - 1)
    params = [p for layer in layers for p in (layer.mu, layer.logsigma)]
    for averaging in ("mean", "sum"):
        fused = kl_terms(layers, averaging)
        g_fused = torch.autograd.grad(2.0 * fused, params)
        for layer in layers:
            layer.fused = False
        ref = kl_terms(layers, averaging)
        g_ref = torch.autograd.grad(2.0 * ref, params)
        for layer in layers:
            layer.fused = True
        assert float(fused.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        for a, b in zip(g_fused, g_ref, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@needs_kernel
def test_two_pending_forwards_of_one_layer_keep_their_own_quantiles():
    layer = LogUniformNoise(5)
    with torch.no_grad():
        layer.logsigma.fill_(-1.0)
    x = torch.randn(16, 5)
    params = (layer.mu, layer.logsigma)

    def grads(together: bool):
        torch.manual_seed(7)
        if together:  # both graphs alive: the second forward may not reuse the first one's buffer
            y1, y2 = layer(x), layer(x)
            return torch.autograd.grad(y1.square().sum() + (3 * y2).sum(), params)
        g1 = torch.autograd.grad(layer(x).square().sum(), params)
        g2 = torch.autograd.grad((3 * layer(x)).sum(), params)
        return [a + b for a, b in zip(g1, g2, strict=True)]

    for a, b in zip(grads(True), grads(False), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fused_noise_in_chunks_on_several_threads_equals_one_call(monkeypatch):
    torch.manual_seed(4)
    layer = LogUniformNoise(6)
    with torch.no_grad():
        layer.mu.copy_(torch.randn(6) * 3 - 3)
        layer.logsigma.copy_(torch.randn(6) - 1)
    x = torch.randn(40, 6, 7, 7, requires_grad=True)
    gy = torch.randn(40, 6, 7, 7)

    def step(chunk: int, threads: int):
        monkeypatch.setattr(bmrs_kernel, "CHUNK", chunk)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(9)
            y = layer(x)
            return (y, *torch.autograd.grad(y, (x, layer.mu, layer.logsigma), gy))
        finally:
            torch.set_num_threads(before)

    whole = step(1 << 30, 1)
    one, three = step(600, 1), step(600, 3)  # 16 rows of 294 elements a chunk: 3 chunks
    assert bmrs_kernel.chunk_rows(6 * 49) == 16
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)  # the thread count changes nothing
    assert torch.equal(one[0], whole[0]) and torch.equal(one[1], whole[1])  # same uniforms per element
    for a, b in zip(one[2:], whole[2:], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # channel sums added in another order
