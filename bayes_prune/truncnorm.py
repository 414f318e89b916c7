"""The truncated log-normal maths of BMRS (methods.md §3.1-§3.3), as tensor functions.

A noise variable theta > 0 is handled in u = log(theta), truncated to [a, b] (a = -20, b = 0):
prior p(u) = Uniform[a, b] (log-uniform on theta), posterior q(u) = N(mu, sigma^2) truncated to
[a, b]. With alpha = (a - mu)/sigma, beta = (b - mu)/sigma and Z = Phi(beta) - Phi(alpha):

    KL(q||p)   = log(b-a) - log(2 pi e)/2 - log sigma - log Z - (alpha phi(alpha) - beta phi(beta)) / (2Z)
    E[theta]   = exp(mu + sigma^2/2) (Phi(beta-sigma) - Phi(alpha-sigma)) / Z
    E[theta^2] = exp(2mu + 2sigma^2) (Phi(beta-2sigma) - Phi(alpha-2sigma)) / Z
    SNR        = E[theta] / sqrt(E[theta^2] - E[theta]^2)

Bayesian model reduction swaps the prior for a reduced one p~ and scores the swap by
dF = ln E_q[p~(u)/p(u)]; a unit is pruned iff dF >= 0.

    BMRS_N: p~ = N(m, s^2) truncated to [a, b] (m = a, s = 1e-6, an approximate spike at theta = e^a)
    BMRS_U: p~ = Uniform[a', b'] with a' = ln 2^-p2, b' = ln 2^-p1 (p2 = 23, p1 = 8 or 4)

Every function works in log space with `log_ndtr`, so tails that underflow Phi (the authors'
`0.5 (1 + erf)` form) stay finite; the ΔF functions expect float64 inputs for the pruning decision.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr

LOG_2PI = math.log(2 * math.pi)
A, B = -20.0, 0.0  # truncation bounds of u = log(theta) (methods.md §3.1)
LOGSIGMA_MIN, LOGSIGMA_MAX = -20.0, 5.0  # the authors' clamp on log sigma
SAMPLE_CLIP = 1e-5  # the sampled CDF value is kept in [clip, 1 - clip] (the authors' eps)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2 (and NaN-free gradients)."""
    near = x > -math.log(2.0)
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, from the tail that keeps precision."""
    upper = lo > 0  # both in the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    big = torch.where(upper, log_ndtr(-lo), log_ndtr(hi))
    small = torch.where(upper, log_ndtr(-hi), log_ndtr(lo))
    return big + log1mexp(torch.clamp(small - big, max=-1e-30))


def sigma_of(logsigma: torch.Tensor, upper_clamp: bool = True) -> torch.Tensor:
    return logsigma.clamp(LOGSIGMA_MIN, LOGSIGMA_MAX if upper_clamp else None).exp()


def bounds(mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return (a - mu) / sigma, (b - mu) / sigma


def log_z(mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B) -> torch.Tensor:
    """log Z, Z = Phi(beta) - Phi(alpha): the posterior's mass inside [a, b] before truncation."""
    alpha, beta = bounds(mu, sigma, a, b)
    return log_ndtr_diff(alpha, beta)


def log_pdf_std(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - 0.5 * LOG_2PI


def kl_log_uniform(mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B) -> torch.Tensor:
    """KL(q||p) per noise variable: the truncated normal's negative entropy plus log(b - a)."""
    alpha, beta = bounds(mu, sigma, a, b)
    lz = log_ndtr_diff(alpha, beta)
    ratio = alpha * torch.exp(log_pdf_std(alpha) - lz) - beta * torch.exp(log_pdf_std(beta) - lz)
    return math.log(b - a) - 0.5 * (LOG_2PI + 1.0) - torch.log(sigma) - lz - 0.5 * ratio


def log_moment(mu: torch.Tensor, sigma: torch.Tensor, k: int, a: float = A, b: float = B
               ) -> torch.Tensor:
    """log E[theta^k] = k mu + k^2 sigma^2/2 + log(Phi(beta - k sigma) - Phi(alpha - k sigma)) - log Z."""
    alpha, beta = bounds(mu, sigma, a, b)
    return (k * mu + 0.5 * (k * sigma) ** 2 + log_ndtr_diff(alpha - k * sigma, beta - k * sigma)
            - log_ndtr_diff(alpha, beta))


def mean_theta(mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B) -> torch.Tensor:
    """E[theta]: the multiplier a noise layer applies at test time."""
    return torch.exp(log_moment(mu, sigma, 1, a, b))


def snr(mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B) -> torch.Tensor:
    """E[theta] / std[theta], as 1 / sqrt(E[theta^2] / E[theta]^2 - 1) (no cancellation of moments)."""
    rel_var = torch.expm1(log_moment(mu, sigma, 2, a, b) - 2 * log_moment(mu, sigma, 1, a, b))
    return torch.rsqrt(rel_var.clamp(min=torch.finfo(rel_var.dtype).tiny))


def inverse_cdf(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, a: float = A, b: float = B,
                clip: float = SAMPLE_CLIP) -> torch.Tensor:
    """u for uniform eps in [0, 1): the authors' reparameterised sample (SBP),
    u = clamp(mu + sigma Phi^-1(clamp(Phi(alpha) + eps Z, clip, 1 - clip)), a, b)."""
    alpha, beta = bounds(mu, sigma, a, b)
    phi_a = torch.special.ndtr(alpha)
    g = (phi_a + eps * (torch.special.ndtr(beta) - phi_a)).clamp(clip, 1 - clip)
    return (mu + sigma * math.sqrt(2.0) * torch.erfinv(2 * g - 1)).clamp(a, b)


def log_density(u: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, a: float = A, b: float = B
                ) -> torch.Tensor:
    """log q(u) of the truncated normal on [a, b] (for tests and numerical checks)."""
    inside = (u >= a) & (u <= b)
    value = log_pdf_std((u - mu) / sigma) - torch.log(sigma) - log_z(mu, sigma, a, b)
    return torch.where(inside, value, torch.full_like(value, -math.inf))


# -- Bayesian model reduction ------------------------------------------------------------------

def delta_f_normal(mu: torch.Tensor, sigma: torch.Tensor, prior_mean: float = A, prior_std: float = 1e-6,
                   exact: bool = False, a: float = A, b: float = B) -> torch.Tensor:
    """ΔF of BMRS_N: reduced prior N(prior_mean, prior_std^2) truncated to [a, b].

    ln E_q[p~/p] = ln[(b-a) Z_q~ / (Z Z~)] - ln(2 pi)/2 - ln(v)/2 - (mu - m)^2 / (2v), v = sigma^2 + s^2,
    with q~ = N(mu_q~, s_q~^2) the precision-weighted product. `exact=False` gives the authors'
    coded value, which lacks the -ln(2 pi)/2 (methods.md §3.3 "constant check"): it prunes
    slightly more readily than exact BMR. This is the simplified form; the coded one subtracts
    terms of size m^2/s^2 ~ 4e14 and loses about 0.1 to rounding.
    """
    var_p = prior_std ** 2
    total = sigma ** 2 + var_p
    mean_q = (mu * var_p + prior_mean * sigma ** 2) / total
    std_q = sigma * prior_std / torch.sqrt(total)
    log_zq = log_ndtr_diff((a - mean_q) / std_q, (b - mean_q) / std_q)
    ref = torch.as_tensor([(a - prior_mean) / prior_std, (b - prior_mean) / prior_std],
                          dtype=mu.dtype, device=mu.device)
    log_zp = log_ndtr_diff(ref[0], ref[1])
    out = (math.log(b - a) + log_zq - log_z(mu, sigma, a, b) - log_zp
           - 0.5 * torch.log(total) - (mu - prior_mean) ** 2 / (2 * total))
    return out - 0.5 * LOG_2PI if exact else out


def delta_f_uniform(mu: torch.Tensor, sigma: torch.Tensor, p1: float = 8.0, p2: float = 23.0,
                    a: float = A, b: float = B) -> torch.Tensor:
    """ΔF of BMRS_U: reduced prior Uniform[ln 2^-p2, ln 2^-p1] (inside [a, b]).

    ln Q(a' <= u <= b') - ln((b' - a')/(b - a)), with mu clamped to [a, b] first (as coded).
    A posterior concentrated below a' has Q ~ 0 and ΔF -> -inf: such a unit is kept (§3.3 caveat).
    """
    lo, hi = -p2 * math.log(2.0), -p1 * math.log(2.0)
    mu = mu.clamp(a, b)
    log_q = log_ndtr_diff((lo - mu) / sigma, (hi - mu) / sigma) - log_z(mu, sigma, a, b)
    return log_q - math.log((hi - lo) / (b - a))
