"""Extended variational inference (eVI): layers that propagate the mean and covariance of a Gaussian
variational posterior through a CNN (methods.md §4.2; Dera, Rasool & Bouaynaya, MLSP 2019).

Every layer maps a `(mean, cov)` pair to a `(mean, cov)` pair; the first convolution (or linear
layer) also takes a plain tensor, a deterministic input. Weights are Gaussian with one variance
per kernel or output unit: `vec(K_k) ~ N(M_k, sigma_k^2 I)`, `M_k` the layer's `weight`, and
`sigma_k^2 = softplus(rho_k)`. Covariances are kept per channel, with no cross-channel terms:
for a (B, C, H, W) feature map, channel c has an (n x n) covariance over its n = H*W positions; a
(B, D) vector is one channel of n = D. Three representations, all exact for what they hold:

    FullCov    dense blocks (B, C, n, n)
    DiagCov    variances only (B, C, n): the diagonal approximation
    LowRankCov s_c diag(v_c) G_c G_c^T diag(v_c) + diag(d_c), G_c rows of a factor F
               (B, 1 or C, n0, r) shared across channels where it can be

A convolution with `covariance="full"` returns a LowRankCov: on a deterministic input x the rule
Sigma_z^k = sigma_k^2 P P^T (P the im2col patch matrix, n x d^2 C_in) is exactly F = P, s = sigma_k^2,
v = 1, d = 0, and ReLU (a row/column mask: v <- v g) and max-pooling (a row/column selection of
the index) keep that form. The linear layer then needs only sqrt(s_c) M_c^T diag(v_c) G_c
(out x r per channel) instead of the n x n blocks, so N x 576 x 576 per example is never
materialised. `.dense()` gives the blocks the table of
§4.2 defines, which is what the tests compare the fast path with.

Usage:

    conv, relu, pool = EVIConv2d(1, 32, 5), EVIReLU(), EVIMaxPool2d(2)
    fc, softmax = EVILinear(32 * 12 * 12, 10), EVISoftmax()
    mean, cov = softmax(fc(pool(relu(conv(x)))))   # (B, 10) and FullCov blocks (B, 1, 10, 10)
    loss = gaussian_nll(mean, cov.blocks[:, 0], F.one_hot(y, 10).float()).mean() \
        + 0.002 * (kl_dera_tf1(conv.weight, conv.sigma2()) + kl_dera_tf1(fc.weight, fc.sigma2()))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Cov", "DiagCov", "EVIConv2d", "EVILinear", "EVIMaxPool2d", "EVIReLU", "EVISoftmax",
           "FullCov", "LowRankCov", "gaussian_nll", "kl_dera_tf1", "kl_exact_gauss"]


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, C or 1, n, ...) rows idx (B, C, m) per channel -> (B, C, m, ...)."""
    b, c, m = idx.shape
    if t.shape[1] == 1 and c > 1:  # a shared factor: one flat index_select (much faster than a
        n = t.shape[2]  # gather over the expanded tensor)
        flat = t.reshape(b * n, *t.shape[3:])
        offsets = (torch.arange(b, device=idx.device) * n).view(b, 1, 1)
        return flat.index_select(0, (idx + offsets).reshape(-1)).view(b, c, m, *t.shape[3:])
    t = t.expand(b, c, *t.shape[2:])
    index = idx.reshape(b, c, m, *[1] * (t.dim() - 3)).expand(b, c, m, *t.shape[3:])
    return t.gather(2, index)


@dataclass
class FullCov:
    """Dense per-channel covariance blocks (B, C, n, n)."""

    blocks: Tensor

    @property
    def channels(self) -> int:
        return self.blocks.shape[1]

    def variance(self) -> Tensor:
        return self.blocks.diagonal(dim1=-2, dim2=-1)

    def dense(self) -> Tensor:
        return self.blocks

    def scale_rows(self, g: Tensor) -> FullCov:
        """Sigma ⊙ g g^T per channel, g (B, C, n) (a bool g is a mask)."""
        g = g.to(self.blocks.dtype)
        return FullCov(self.blocks * g.unsqueeze(-1) * g.unsqueeze(-2))

    def select(self, idx: Tensor) -> FullCov:
        """Rows and columns idx (B, C, m) of every channel's block."""
        rows = _gather_rows(self.blocks, idx)  # (B, C, m, n)
        return FullCov(rows.gather(3, idx.unsqueeze(2).expand(*idx.shape[:2], idx.shape[2], -1)))

    def trace(self) -> Tensor:
        return self.variance().sum((1, 2))

    def project(self, w: Tensor) -> Tensor:
        """sum_c W_c Sigma_c W_c^T for W (out, C, n): (B, out, out)."""
        wc = w.transpose(0, 1)  # (C, out, n)
        return torch.einsum("con,bcnm,cpm->bop", wc, self.blocks, wc)


@dataclass
class DiagCov:
    """Per-position variances (B, C, n): the diagonal approximation of the per-channel blocks."""

    var: Tensor

    @property
    def channels(self) -> int:
        return self.var.shape[1]

    def variance(self) -> Tensor:
        return self.var

    def dense(self) -> Tensor:
        return torch.diag_embed(self.var)

    def scale_rows(self, g: Tensor) -> DiagCov:
        return DiagCov(self.var * g.to(self.var.dtype).square())

    def select(self, idx: Tensor) -> DiagCov:
        return DiagCov(self.var.gather(2, idx))

    def trace(self) -> Tensor:
        return self.var.sum((1, 2))

    def project(self, w: Tensor) -> Tensor:
        """sum_k v_k w_k w_k^T over the flattened positions k. From a batch of 2 x out examples on,
        one product with the (k, out^2) table of w_k w_k^T, which does not depend on the batch
        (measured on the CPU: the two cost the same at 16 examples for out = 10)."""
        b, out = self.var.shape[0], w.shape[0]
        flat = w.reshape(out, -1)
        var = self.var.reshape(b, -1)
        if b < 2 * out:
            return (flat.unsqueeze(0) * var.unsqueeze(1)) @ flat.t()
        cols = flat.t()
        outer = (cols.unsqueeze(2) * cols.unsqueeze(1)).reshape(cols.shape[0], out * out)
        return (var @ outer).view(b, out, out)


@dataclass
class LowRankCov:
    """Sigma_c = s_c diag(v_c) G_c G_c^T diag(v_c) + diag(d_c), G_c = the rows `index_c` of the
    factor F_c. The pieces are kept apart because each layer touches one of them:

        factor  (B, 1 or C, n0, r): F; one channel = shared by all (the conv's patches P)
        var     (C,): s_c, the channel's scale (the kernel variance sigma_c^2)
        rows    (B, C, n) or None: row weights v; None = ones. A bool tensor (ReLU's mask g) is
                applied by selecting a zero row, not by a product
        index   (B, C, n) or None: the factor row each position holds (max-pool's selections);
                None = the identity (n = n0)
        diag    (B, C, n) or None: an extra diagonal d
    """

    factor: Tensor
    var: Tensor
    rows: Tensor | None = None
    index: Tensor | None = None
    diag: Tensor | None = None
    energy: Tensor | None = None  # squared row norms of the factor (B, 1 or C, n0)

    def __post_init__(self) -> None:
        if self.energy is None:
            self.energy = self.factor.square().sum(-1)

    @property
    def channels(self) -> int:
        return self.var.shape[0]

    def _shape(self) -> tuple[int, int, int]:
        b, _, n0, _ = self.factor.shape
        n = n0 if self.index is None else self.index.shape[2]
        return b, self.channels, n

    def _index(self) -> Tensor:
        if self.index is not None:
            return self.index
        b, c, n = self._shape()
        return torch.arange(n, device=self.factor.device).expand(b, c, n)

    def variance(self) -> Tensor:
        b, c, n = self._shape()
        e = self.energy.expand(b, c, -1) if self.index is None else _gather_rows(self.energy,
                                                                                 self.index)
        v = self.var.view(1, c, 1) * e
        if self.rows is not None:
            v = v * self._weights().square()
        return v if self.diag is None else v + self.diag

    def _weights(self) -> Tensor:
        return self.rows.to(self.factor.dtype)

    def dense(self) -> Tensor:
        b, c, n = self._shape()
        g = _gather_rows(self.factor, self._index())  # (B, C, n, r)
        v = self.var.sqrt().view(1, c, 1).expand(b, c, n)
        if self.rows is not None:
            v = v * self._weights()
        g = v.unsqueeze(-1) * g
        out = g @ g.transpose(-1, -2)
        return out if self.diag is None else out + torch.diag_embed(self.diag)

    def scale_rows(self, g: Tensor) -> LowRankCov:
        if self.rows is None:
            rows = g
        elif self.rows.dtype == torch.bool and g.dtype == torch.bool:
            rows = self.rows & g
        else:
            rows = self._weights() * g.to(self.factor.dtype)
        diag = None if self.diag is None else self.diag * g.to(self.diag.dtype).square()
        return LowRankCov(self.factor, self.var, rows, self.index, diag, self.energy)

    def select(self, idx: Tensor) -> LowRankCov:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.gather(2, idx)

        index = idx if self.index is None else self.index.gather(2, idx)
        return LowRankCov(self.factor, self.var, pick(self.rows), index, pick(self.diag),
                          self.energy)

    def trace(self) -> Tensor:
        return self.variance().sum((1, 2))

    def project(self, w: Tensor) -> Tensor:
        """sum_c W_c Sigma_c W_c^T as one matrix product per channel over the whole batch:
        A_c = sqrt(s_c) W_c diag(v_c) G_c is (out x B r), Sigma_f = sum_c A_c A_c^T."""
        b, c, n = self._shape()
        out, r = w.shape[0], self.factor.shape[-1]
        masked = self.rows is not None and self.rows.dtype == torch.bool
        if self.factor.shape[1] == 1:  # one flat index_select of the shared factor's rows
            idx = self._index().permute(1, 2, 0)  # (C, n, B): the batch innermost
            n0 = self.factor.shape[2]
            flat = self.factor.reshape(b * n0, r)
            idx = idx + torch.arange(b, device=idx.device) * n0
            if masked:  # masked-out rows select an appended zero row
                flat = torch.cat([flat, flat.new_zeros(1, r)])
                idx = torch.where(self.rows.permute(1, 2, 0), idx, b * n0)
            g = flat.index_select(0, idx.reshape(-1)).view(c, n, b, r)
        else:
            g = _gather_rows(self.factor, self._index()).permute(1, 2, 0, 3)
            if masked:
                g = g * self._weights().permute(1, 2, 0).unsqueeze(-1)
        if self.rows is not None and not masked:
            g = g * self.rows.permute(1, 2, 0).unsqueeze(-1)
        wc = w.transpose(0, 1) * self.var.sqrt().view(c, 1, 1)  # (C, out, n)
        a = (wc @ g.reshape(c, n, b * r)).view(c, out, b, r)
        a = a.permute(2, 1, 0, 3).reshape(b, out, c * r)
        result = a @ a.transpose(1, 2)
        return result if self.diag is None else result + DiagCov(self.diag).project(w)


Cov = FullCov | DiagCov | LowRankCov
Moments = tuple[Tensor, Cov]


def _rows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H*W); (B, D) -> (B, 1, D): the rows of the per-channel blocks."""
    return t.flatten(2) if t.dim() == 4 else t.unsqueeze(1)


class _Variational:
    """The per-unit variance sigma^2 = softplus(rho) and the eVI initialisation shared by the
    convolution and the linear layer. `mean_std` and `truncated`: the means' initial normal
    (truncated at 2 std as TensorFlow's truncated_normal); `rho_range`: rho ~ U(lo, hi)."""

    weight: Tensor
    rho: nn.Parameter

    def _init_variational(self, units: int, mean_std: float, truncated: bool,
                          rho_range: tuple[float, float]) -> None:
        self.mean_std, self.truncated, self.rho_range = mean_std, truncated, tuple(rho_range)
        self.rho = nn.Parameter(torch.empty(units, device=self.weight.device, dtype=self.weight.dtype))
        self.reset_variational()

    @torch.no_grad()
    def reset_variational(self) -> None:
        if self.truncated:
            nn.init.trunc_normal_(self.weight, 0.0, self.mean_std, -2 * self.mean_std,
                                  2 * self.mean_std)
        else:
            nn.init.normal_(self.weight, 0.0, self.mean_std)
        lo, hi = self.rho_range
        if hi > lo:
            self.rho.uniform_(lo, hi)
        else:
            self.rho.fill_(lo)
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.fill_(1e-5)

    def sigma2(self) -> Tensor:
        """sigma_k^2 per kernel (conv) or output unit (linear)."""
        return F.softplus(self.rho)


class EVIConv2d(nn.Conv2d, _Variational):
    """Convolution whose kernel k is N(M_k, sigma_k^2 I) (no bias, as in the eVI code).

    Deterministic input x: mean x * M_k, covariance sigma_k^2 P P^T. Random input (mean, cov):
    mean mu * M_k, covariance sigma_k^2 P_mu P_mu^T + diag_i(sigma_k^2 sum_{patch i} var)
    + diag_i(sum_{patch i} M_k^2 var), var = diag of the input covariance (methods.md §4.2).
    `covariance`: "full" (LowRankCov, exact) or "diagonal" (DiagCov: the variances only).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, covariance: str = "full", mean_std: float = 0.1,
                 truncated: bool = True, rho_range: tuple[float, float] = (-12.0, -2.2),
                 device=None, dtype=None) -> None:
        if covariance not in ("full", "diagonal"):
            raise ValueError(f"covariance={covariance!r}: expected 'full' or 'diagonal'")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=False,
                         device=device, dtype=dtype)
        self.covariance = covariance
        self._init_variational(out_channels, mean_std, truncated, rho_range)

    def _patches(self, x: Tensor) -> Tensor:
        """im2col: (B, L, C_in*d*d), in the order of weight.flatten(1)."""
        return F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride).transpose(1, 2)

    def _patch_sums(self, v: Tensor, kernel: Tensor) -> Tensor:
        return F.conv2d(v, kernel, None, self.stride, self.padding, self.dilation).flatten(2)

    def forward(self, x: Tensor | Moments) -> Moments:
        if isinstance(x, Tensor):
            mean_in, cov_in = x, None
        else:
            mean_in, cov_in = x
        mean = F.conv2d(mean_in, self.weight, None, self.stride, self.padding, self.dilation)
        b, k = mean.shape[:2]
        s2 = self.sigma2()
        p = self._patches(mean_in)  # (B, L, r)
        extra = None
        if cov_in is not None:
            var_in = cov_in.variance().reshape(mean_in.shape)
            ones = torch.ones_like(self.weight[:1])
            extra = (s2.view(1, k, 1) * self._patch_sums(var_in, ones)
                     + self._patch_sums(var_in, self.weight.square()))
        if self.covariance == "diagonal":
            var = s2.view(1, k, 1) * p.square().sum(-1).unsqueeze(1)
            return mean, DiagCov(var if extra is None else var + extra)
        return mean, LowRankCov(p.unsqueeze(1), s2, diag=extra)


class EVIReLU(nn.Module):
    """First-order Taylor: mean ReLU(mu), covariance Sigma ⊙ g g^T with g = 1[mu > 0]."""

    def forward(self, x: Moments) -> Moments:
        mean, cov = x
        return F.relu(mean), cov.scale_rows(_rows(mean > 0))


class EVIMaxPool2d(nn.Module):
    """Max-pooling of the mean; the covariance keeps the rows and columns of the argmax positions."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride or kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode

    def forward(self, x: Moments) -> Moments:
        mean, cov = x
        out, idx = F.max_pool2d(mean, self.kernel_size, self.stride, self.padding,
                                ceil_mode=self.ceil_mode, return_indices=True)
        return out, cov.select(idx.flatten(2))


class EVILinear(nn.Linear, _Variational):
    """Fully connected layer whose output unit j has weights N(m_j, sigma_j^2 I) (and a bias mean).

    On the flattened input b (channel blocks, no cross-channel covariance): mean M^T mu_b + bias,
    covariance M^T Sigma_b M + diag_j(sigma_j^2 (tr Sigma_b + mu_b^T mu_b)). Returns a FullCov with
    one (out x out) block. A deterministic input x gives diag_j(sigma_j^2 x^T x).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mean_std: float = 0.1, truncated: bool = True,
                 rho_range: tuple[float, float] = (-12.0, -2.2), device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_variational(out_features, mean_std, truncated, rho_range)

    def forward(self, x: Tensor | Moments) -> Moments:
        mean_in, cov_in = (x, None) if isinstance(x, Tensor) else x
        flat = mean_in.flatten(1)
        mean = F.linear(flat, self.weight, self.bias)
        energy = flat.square().sum(1)
        if cov_in is None:
            cov = torch.diag_embed(self.sigma2() * energy.unsqueeze(1))
        else:
            c = cov_in.channels
            w = self.weight.view(self.out_features, c, self.in_features // c)
            spread = (cov_in.trace() + energy).unsqueeze(1)
            cov = cov_in.project(w) + torch.diag_embed(self.sigma2() * spread)
        return mean, FullCov(cov.unsqueeze(1))


class EVISoftmax(nn.Module):
    """First-order Taylor: mean softmax(mu), covariance J Sigma J^T, J = diag(p) - p p^T."""

    def forward(self, x: Moments) -> Moments:
        mean, cov = x
        p = torch.softmax(mean, -1)
        jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return p, FullCov((jac @ cov.dense()[:, 0] @ jac).unsqueeze(1))


# -- the ELBO's terms ----------------------------------------------------------------------------


def gaussian_nll(mean: Tensor, cov: Tensor, target: Tensor, eps: float = 1e-3,
                 clip: tuple[float, float] | None = (1e-10, 1e10)) -> Tensor:
    """Per-example ½ (y - mu)^T (Sigma + eps I)^{-1} (y - mu) + ½ log det(Sigma + eps I): the
    Gaussian likelihood of the one-hot target on the propagated moments (B, K), (B, K, K).
    `clip` clamps Sigma elementwise first, as the TF1 code does (it zeroes the negative
    off-diagonal covariances); None keeps Sigma as it is."""
    if clip is not None:
        cov = cov.clamp(*clip)
    s = cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    r = (target - mean).unsqueeze(-1)
    maha = (r.transpose(-1, -2) @ torch.linalg.solve(s, r)).reshape(-1)
    return 0.5 * maha + 0.5 * torch.logdet(s)


def kl_dera_tf1(weight: Tensor, sigma2: Tensor) -> Tensor:
    """The TF1 eVI code's KL term of one layer, -½ mean_k[n + n ln s_k - sum|M| - n s_k] with
    n = weights per kernel (or output unit) and the L1 norm of all the layer's means where the
    exact Gaussian KL has the squared Frobenius norm (methods.md §4.3)."""
    n = weight[0].numel()
    return 0.5 * weight.abs().sum() + 0.5 * n * (sigma2 - sigma2.log() - 1).mean()


def kl_exact_gauss(weight: Tensor, sigma2: Tensor) -> Tensor:
    """KL(N(M_k, s_k I) || N(0, I)) summed over kernels: ½ sum_k[n s_k + |M_k|^2 - n - n ln s_k]."""
    n = weight[0].numel()
    sq = weight.square().flatten(1).sum(1)
    return 0.5 * (n * sigma2 + sq - n - n * sigma2.log()).sum()
