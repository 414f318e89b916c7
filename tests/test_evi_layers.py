"""eVI layers (bayes_prune/evi.py): the propagated moments against Monte Carlo sampling, the fast
low-rank path against the §4.2 rules written out naively, and the ELBO's terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bayes_prune.evi import (
    DiagCov,
    EVIConv2d,
    EVILinear,
    EVIMaxPool2d,
    EVIReLU,
    EVISoftmax,
    FullCov,
    LowRankCov,
    gaussian_nll,
    kl_dera_tf1,
    kl_exact_gauss,
)

S = 20000  # Monte Carlo samples


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def conv(c_in=1, c_out=3, k=3, covariance="full", rho=(-3.0, -1.0)):
    torch.manual_seed(0)
    return EVIConv2d(c_in, c_out, k, covariance=covariance, mean_std=0.5, rho_range=rho)


def mc_moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, C, n) and per-channel covariance (B, C, n, n) of samples (S, B, C, n)."""
    mean = samples.mean(0)
    d = samples - mean
    return mean, torch.einsum("sbci,sbcj->bcij", d, d) / (len(samples) - 1)


def sample_conv(layer: EVIConv2d, x: torch.Tensor) -> torch.Tensor:
    """S draws of the convolution output with kernels K_k ~ N(M_k, s_k I): (S, B, C, n)."""
    w = layer.weight.flatten(1)
    kernels = w + layer.sigma2().sqrt().view(-1, 1) * torch.randn(S, *w.shape)  # (S, C, r)
    xs = x.expand(S, *x.shape) if x.dim() == 4 else x
    patches = F.unfold(xs.flatten(0, 1), layer.kernel_size).view(S, x.shape[-4], w.shape[1], -1)
    return torch.einsum("scr,sbrl->sbcl", kernels, patches)


# -- each layer against Monte Carlo --------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_conv_on_a_deterministic_input_matches_monte_carlo(covariance):
    layer = conv(covariance=covariance)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        mean, cov = layer(x)
        mc_mean, mc_cov = mc_moments(sample_conv(layer, x))
    assert torch.allclose(mean.flatten(2), mc_mean, atol=0.03)
    ref = mc_cov if covariance == "full" else torch.diagonal(mc_cov, dim1=-2, dim2=-1)
    got = cov.dense() if covariance == "full" else cov.variance()
    assert torch.allclose(got, ref, rtol=0.06, atol=0.01 * float(ref.abs().max()))


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_conv_on_a_random_input_matches_monte_carlo_in_mean_and_variance(covariance):
    """Independent input pixels: the rule's variances are exact (its off-diagonal terms drop the
    input covariance between overlapping patches, a first-order simplification of the eVI code)."""
    layer = conv(c_in=2, covariance=covariance)
    mu = torch.randn(1, 2, 5, 5)
    var = 0.05 + 0.1 * torch.rand(1, 2, 5, 5)
    xs = mu + var.sqrt() * torch.randn(S, 1, 2, 5, 5)
    with torch.no_grad():
        mean, cov = layer((mu, DiagCov(var.flatten(2))))
        mc_mean, mc_cov = mc_moments(sample_conv(layer, xs))
    mc_var = torch.diagonal(mc_cov, dim1=-2, dim2=-1)
    assert torch.allclose(mean.flatten(2), mc_mean, atol=0.03)
    assert torch.allclose(cov.variance(), mc_var, rtol=0.06)


def moments_input(b=2, c=2, h=4, w=4, var=1e-3, full=True):
    """Input moments in the Taylor regime: means away from ReLU's kink, and in every 2x2 pooling
    window one mean clearly the largest."""
    torch.manual_seed(1)
    mean = (torch.rand(b, c, h, w) + 0.3) * torch.where(torch.rand(b, c, h, w) > 0.3, 1, -1)
    winner = F.one_hot(torch.randint(4, (b, c, h // 2, w // 2)), 4).view(b, c, h // 2, w // 2, 2, 2)
    mean = mean + 3.0 * winner.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
    n = h * w
    if full:
        a = torch.randn(b, c, n, n)
        blocks = var * (a @ a.transpose(-1, -2) / n + 0.5 * torch.eye(n))
        return mean, FullCov(blocks)
    return mean, DiagCov(var * (0.5 + torch.rand(b, c, n)))


def sample_input(mean, cov):
    b, c = mean.shape[:2]
    n = mean[0, 0].numel()
    chol = torch.linalg.cholesky(cov.dense())
    eps = torch.randn(S, b, c, n, 1)
    return mean.unsqueeze(0) + (chol @ eps).squeeze(-1).view(S, *mean.shape)


@pytest.mark.parametrize("full", [True, False])
def test_relu_matches_monte_carlo_in_the_taylor_regime(full):
    mean, cov = moments_input(full=full)
    xs = sample_input(mean, cov)
    out_mean, out_cov = EVIReLU()((mean, cov))
    mc_mean, mc_cov = mc_moments(F.relu(xs).flatten(3))
    assert torch.allclose(out_mean.flatten(2), mc_mean, atol=5e-3)
    assert torch.allclose(out_cov.dense(), mc_cov, atol=1e-4)


@pytest.mark.parametrize("full", [True, False])
def test_max_pool_matches_monte_carlo_when_the_maxima_are_clear(full):
    mean, cov = moments_input(full=full)
    xs = sample_input(mean, cov)
    out_mean, out_cov = EVIMaxPool2d(2)((mean, cov))
    mc_mean, mc_cov = mc_moments(F.max_pool2d(xs.flatten(0, 1), 2).view(S, 2, 2, 4))
    assert torch.allclose(out_mean.flatten(2), mc_mean, atol=5e-3)
    assert torch.allclose(out_cov.dense(), mc_cov, atol=1e-4)


@pytest.mark.parametrize("full", [True, False])
@torch.no_grad()
def test_linear_on_a_random_input_matches_monte_carlo(full):
    torch.manual_seed(2)
    layer = EVILinear(2 * 16, 3, mean_std=0.5, rho_range=(-3.0, -1.0))
    mean, cov = moments_input(var=0.05, full=full)
    xs = sample_input(mean, cov).flatten(2)  # (S, B, 32)
    std = layer.sigma2().sqrt().view(1, 3, 1)
    ws = layer.weight.unsqueeze(0) + std * torch.randn(S, 3, 32)
    ys = (torch.einsum("soi,sbi->sbo", ws, xs) + layer.bias).unsqueeze(2)
    with torch.no_grad():
        out_mean, out_cov = layer((mean, cov))
    mc_mean, mc_cov = mc_moments(ys)
    assert torch.allclose(out_mean, mc_mean[:, 0], atol=0.02 * float(mc_mean.abs().max()))
    assert torch.allclose(out_cov.blocks, mc_cov, rtol=0.06, atol=0.02 * float(mc_cov.abs().max()))


@torch.no_grad()
def test_linear_on_a_deterministic_input_matches_monte_carlo():
    torch.manual_seed(3)
    layer = EVILinear(6, 3, mean_std=0.5, rho_range=(-2.0, -1.0))
    x = torch.randn(2, 6)
    ws = layer.weight + layer.sigma2().sqrt().view(3, 1) * torch.randn(S, 3, 6)
    ys = (torch.einsum("soi,bi->sbo", ws, x) + layer.bias).unsqueeze(2)
    with torch.no_grad():
        mean, cov = layer(x)
    mc_mean, mc_cov = mc_moments(ys)
    assert torch.allclose(mean, mc_mean[:, 0], atol=0.03)
    assert torch.allclose(cov.blocks, mc_cov, rtol=0.06, atol=0.02 * float(mc_cov.abs().max()))


def test_softmax_matches_monte_carlo_for_small_variances():
    torch.manual_seed(4)
    mean = torch.randn(2, 4)
    a = torch.randn(2, 4, 4)
    blocks = 1e-3 * (a @ a.transpose(-1, -2) + torch.eye(4))
    xs = mean + (torch.linalg.cholesky(blocks) @ torch.randn(S, 2, 4, 1)).squeeze(-1)
    p, cov = EVISoftmax()((mean, FullCov(blocks.unsqueeze(1))))
    mc_mean, mc_cov = mc_moments(torch.softmax(xs, -1).unsqueeze(2))
    assert torch.allclose(p, mc_mean[:, 0], atol=2e-3)
    assert torch.allclose(cov.blocks, mc_cov, atol=2e-5)


# -- the fast path equals the §4.2 rules written out ---------------------------------------------


def naive_network(conv_layer, fc, x, diagonal=False):
    """The table of methods.md §4.2 with every per-channel block materialised."""
    k = conv_layer.out_channels
    p = F.unfold(x, conv_layer.kernel_size).transpose(1, 2)  # (B, L, r)
    ppt = p @ p.transpose(1, 2)
    mu_z = F.conv2d(x, conv_layer.weight)
    sigma_z = conv_layer.sigma2().view(1, k, 1, 1) * ppt.unsqueeze(1)  # (B, K, L, L)
    if diagonal:
        sigma_z = torch.diag_embed(torch.diagonal(sigma_z, dim1=-2, dim2=-1))
    g = (mu_z > 0).to(x.dtype).flatten(2)
    sigma_g = sigma_z * g.unsqueeze(-1) * g.unsqueeze(-2)
    mu_p, idx = F.max_pool2d(F.relu(mu_z), 2, return_indices=True)
    idx = idx.flatten(2)
    b, _, m = idx.shape
    sigma_p = torch.stack([torch.stack([sigma_g[i, c][idx[i, c]][:, idx[i, c]] for c in range(k)])
                           for i in range(b)])
    mu_b = mu_p.flatten(1)
    m_fc = fc.weight.t()  # (D, out)
    blocks = m_fc.view(k, m, -1)
    sigma_f = torch.einsum("cmo,bcmn,cnp->bop", blocks, sigma_p, blocks)
    tr = torch.diagonal(sigma_p, dim1=-2, dim2=-1).sum((1, 2))
    sigma_f = sigma_f + torch.diag_embed(fc.sigma2() * (tr + mu_b.square().sum(1)).unsqueeze(1))
    mu_f = mu_b @ m_fc + fc.bias
    mu_y = torch.softmax(mu_f, -1)
    jac = torch.diag_embed(mu_y) - mu_y.unsqueeze(-1) * mu_y.unsqueeze(-2)
    return mu_y, jac @ sigma_f @ jac, sigma_p


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_the_fast_path_equals_the_naive_rules(covariance):
    torch.manual_seed(5)
    conv_layer = EVIConv2d(1, 4, 3, covariance=covariance, rho_range=(-3.0, -1.0))
    fc = EVILinear(4 * 3 * 3, 5, mean_std=0.3, rho_range=(-3.0, -1.0))
    x = torch.rand(3, 1, 8, 8)
    pooled = EVIMaxPool2d(2)(EVIReLU()(conv_layer(x)))
    mean, cov = EVISoftmax()(fc(pooled))
    ref_mean, ref_cov, ref_pooled = naive_network(conv_layer, fc, x, covariance == "diagonal")
    assert isinstance(pooled[1], LowRankCov if covariance == "full" else DiagCov)
    assert torch.allclose(pooled[1].dense(), ref_pooled, atol=1e-12)
    assert torch.allclose(mean, ref_mean, atol=1e-12)
    assert torch.allclose(cov.blocks[:, 0], ref_cov, atol=1e-12)


def test_dense_blocks_through_the_same_layers_give_the_same_moments():
    """LowRankCov, its materialised FullCov and (on the variances) DiagCov agree layer by layer."""
    torch.manual_seed(6)
    conv_layer = EVIConv2d(2, 3, 3, rho_range=(-3.0, -1.0))
    fc = EVILinear(3 * 3 * 3, 4, rho_range=(-3.0, -1.0))
    mu = torch.randn(2, 2, 8, 8)
    var = torch.rand(2, 2, 64) * 0.1
    mean, low = conv_layer((mu, DiagCov(var)))  # a random input: low rank plus a diagonal
    dense = FullCov(low.dense())
    for layer in (EVIReLU(), EVIMaxPool2d(2)):
        (mean, low), (_, dense) = layer((mean, low)), layer((mean, dense))
        assert torch.allclose(low.dense(), dense.dense(), atol=1e-12)
        assert torch.allclose(low.variance(), dense.variance(), atol=1e-12)
    assert torch.allclose(fc((mean, low))[1].blocks, fc((mean, dense))[1].blocks, atol=1e-12)


@pytest.mark.parametrize("batch", [2, 24])
def test_diagonal_projection_is_the_same_on_both_of_its_paths(batch):
    var = torch.rand(batch, 3, 5)
    w = torch.randn(10, 3, 5)
    ref = torch.einsum("ocn,bcn,pcn->bop", w, var, w)
    assert torch.allclose(DiagCov(var).project(w), ref, atol=1e-12)
    assert torch.allclose(FullCov(torch.diag_embed(var)).project(w), ref, atol=1e-12)


# -- the ELBO's terms ----------------------------------------------------------------------------


def test_gaussian_nll_is_the_negative_log_density_up_to_its_constant():
    torch.manual_seed(7)
    mean = torch.softmax(torch.randn(3, 4), -1)
    a = torch.randn(3, 4, 4)
    cov = 0.01 * a @ a.transpose(-1, -2)
    y = F.one_hot(torch.tensor([0, 2, 3]), 4).double()
    got = gaussian_nll(mean, cov, y, eps=1e-3, clip=None)
    dist = torch.distributions.MultivariateNormal(mean, cov + 1e-3 * torch.eye(4))
    assert torch.allclose(got, -dist.log_prob(y) - 2 * torch.log(torch.tensor(2 * torch.pi)))


def test_the_tf1_clip_zeroes_negative_covariances():
    cov = torch.tensor([[[0.2, -0.1], [-0.1, 0.3]]])
    y, mean = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.4]])
    clipped = gaussian_nll(mean, cov, y, clip=(1e-10, 1e10))
    diag = gaussian_nll(mean, torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1)), y, clip=None)
    assert torch.allclose(clipped, diag, atol=1e-9)
    assert not torch.allclose(clipped, gaussian_nll(mean, cov, y, clip=None))


def test_exact_gauss_kl_equals_the_closed_form_kl_of_each_kernel():
    w = torch.randn(4, 2, 3, 3)
    s2 = torch.rand(4) + 0.1
    q = torch.distributions.Normal(w, s2.sqrt().view(4, 1, 1, 1))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    assert torch.allclose(kl_exact_gauss(w, s2), ref)


def test_dera_tf1_kl_has_the_l1_norm_of_the_means():
    w = torch.randn(4, 1, 5, 5)
    s2 = torch.rand(4) + 0.1
    n = 25
    ref = -0.5 * torch.mean(n + n * s2.log() - w.abs().sum() - n * s2)
    assert torch.allclose(kl_dera_tf1(w, s2), ref)
    w2 = w.clone()
    w2[0] *= 2  # doubling one kernel adds its L1 norm / 2, not its squared norm
    assert torch.allclose(kl_dera_tf1(w2, s2) - kl_dera_tf1(w, s2), 0.5 * w[0].abs().sum())


@pytest.mark.parametrize("kl, reaches_zero", [(kl_dera_tf1, False), (kl_exact_gauss, True)])
def test_adam_drives_a_dead_kernel_to_zero_under_the_l2_kl_but_not_the_l1_one(kl, reaches_zero):
    """A dead kernel (ReLU never active) gets no likelihood gradient: only tau x KL moves its mean.
    Adam's steps have the size of lr whatever the gradient's, so under the L1 norm of the TF1 KL the
    mean hovers about 0 at the scale of lr, never <= 1e-7; the exact KL's squared norm shrinks
    the gradient with the mean and Adam's steps with it, down to 0 (why zero kernels need it)."""
    torch.manual_seed(8)
    weight = torch.nn.Parameter(0.1 * torch.randn(1, 1, 5, 5))
    rho = torch.nn.Parameter(torch.full((1,), -3.0))
    opt = torch.optim.Adam([weight, rho], lr=1e-3)
    for _ in range(4000):
        opt.zero_grad()
        (0.002 * kl(weight, torch.nn.functional.softplus(rho))).backward()
        opt.step()
    norm = float(weight.detach().norm())
    assert (norm <= 1e-7) == reaches_zero
    if not reaches_zero:
        assert 1e-5 < norm < 1e-2  # the lr scale
