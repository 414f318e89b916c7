"""Layer-wise second-order pruning (methods.md §2): Hessians, OBS downdates, exact row-wise OBS
(OBC), paper 001's approximate L-OBS, SparseGPT, magnitude, and the layer reconstruction error.

One layer is a matrix W (rows = outputs, columns = inputs; a conv kernel flattened as im2col
flattens its patches), optionally with its bias folded in as a last column fed by a constant 1.
Its layer-wise error ||(Ŵ - W) X||² has, for every row, the Hessian H = (1/N) Σ x xᵀ (the same
for all rows), so rows are independent problems sharing H. The last `n_fixed` columns (the bias)
take part in every compensation but are never pruned. Everything here takes tensors and returns
tensors, in float64, on whatever device the tensors are on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
CHUNK = 1 << 16  # input vectors per float64 Hessian product


# -- Hessians ------------------------------------------------------------------------------------


def patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input vectors, one per row: (N, d_col) for a Linear, (N * positions,
    C·kh·kw) im2col patches for a Conv2d, ordered like `weight.flatten(1)`'s columns."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # (N, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                         or isinstance(layer.padding, str)):
        raise ValueError(f"layer-wise OBS handles Conv2d with groups=1, numeric zero padding "
                         f"only; got {layer}")
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise ValueError(f"layer-wise OBS prunes Linear and Conv2d layers, not {type(layer).__name__}")


@torch.no_grad()
def hessians(model: nn.Module, layers: dict[str, nn.Module], x: Tensor, batch_size: int,
             fold_bias: bool) -> dict[str, Tensor]:
    """H = (1/N) Σ x xᵀ (float64) of each layer's inputs over the calibration images `x`, in one
    pass of `model` as it stands; the bias's constant 1 is appended when folded."""
    sums = {n: None for n in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str, layer: nn.Module):
        def record(mod: nn.Module, args: tuple) -> None:
            cols = patches(layer, args[0])
            for i in range(0, len(cols), CHUNK):  # float64 copies of at most CHUNK rows
                c = cols[i:i + CHUNK].double()
                if fold_bias and layer.bias is not None:
                    c = torch.cat([c, c.new_ones(len(c), 1)], 1)
                h = c.T @ c
                sums[name] = h if sums[name] is None else sums[name].add_(h)
            counts[name] += len(cols)
        return record

    for layer in layers.values():
        check_layer(layer)
    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in layers}


def layer_matrix(layer: nn.Module, fold_bias: bool) -> Tensor:
    """(rows, d_col [+1]) float64: the flattened weight, with the bias as a last column if folded."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if fold_bias and layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double()[:, None]], 1)
    return w


@torch.no_grad()
def write_layer(layer: nn.Module, w: Tensor, fold_bias: bool) -> None:
    """Write a `layer_matrix`-shaped matrix back into the layer's weight (and bias)."""
    d_col = layer.weight[0].numel()
    layer.weight.copy_(w[:, :d_col].reshape(layer.weight.shape).to(layer.weight.dtype))
    if fold_bias and layer.bias is not None:
        layer.bias.copy_(w[:, d_col].to(layer.bias.dtype))


def damped(h: Tensor, damp: float) -> Tensor:
    """H + damp · mean(diag H) · I. A dead input (diag 0: never nonzero on the calibration set)
    is decoupled from the others (its row and column of H are 0): with H_ii = max(damp, 1e-8) ·
    mean(diag H) its weights cost next to nothing, go first and compensate nothing. (OBC sets
    H_ii = 1 and zeroes those weights up front, which would prune more than the target when they
    outnumber it.)"""
    h = h.clone()
    mean = float(h.diagonal().mean())
    dead = h.diagonal() == 0
    h.diagonal().add_(damp * mean)
    h.diagonal()[dead] = max(damp, 1e-8) * mean if mean > 0 else 1.0
    return h


def positive_definite(h: Tensor) -> Tensor:
    """H itself if Cholesky succeeds, else H + 1e-6 · mean(diag H) · I, else H + I."""
    for extra in (0.0, 1e-6 * float(h.diagonal().mean()), 1.0):
        hh = h + extra * torch.eye(len(h), dtype=h.dtype, device=h.device) if extra else h
        if int(torch.linalg.cholesky_ex(hh)[1]) == 0:
            return hh
    raise torch.linalg.LinAlgError("the layer Hessian is not positive definite even with damping")


def inverse(h: Tensor) -> Tensor:
    """H⁻¹ of a positive definite H, by Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def downdate(g: Tensor, p: Tensor) -> Tensor:
    """Remove coordinate p[b] from the inverse g[b] (batched (B, f, f)): one Gaussian-elimination
    step, G - G[:, p] G[p, :] / G[p, p]. Row and column p become 0 and the rest is exactly the
    inverse of H restricted to the remaining coordinates (methods.md §2.3)."""
    b = torch.arange(len(g), device=g.device)
    col = g[b, p, :]  # G is symmetric: row p = column p
    return g - col[:, :, None] * col[:, None, :] / col[b, p][:, None, None]


def reconstruction_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """||(Ŵ - W) X||² / ||W X||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), with the undamped H."""
    dw = w_hat - w
    num = float(((dw @ h) * dw).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def k_smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest entries of `scores` (any shape), ties broken by flat index."""
    flat = scores.flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.argsort(flat, stable=True)[:k]] = True
    return chosen.view_as(scores)


# -- exact row-wise OBS (OBC) --------------------------------------------------------------------


def obs_traces(w: Tensor, hinv: Tensor, n_prunable: int, row_batch: int = 128, block: int = 32,
               keep_weights: bool = False, max_bytes: int = 1 << 30
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Greedy OBS on every row to the end: at each step remove the coordinate p (among the first
    `n_prunable` columns) with the least loss w_p² / (2 [G]_pp), compensate the row with
    -(w_p / G_pp) G[:, p], and downdate G, the inverse of H restricted to the row's remaining
    coordinates.

    Returns the removal order (rows, n_prunable), the loss of each step (same shape) and, with
    `keep_weights`, every row after each step (rows, n_prunable + 1, d; for tests).
    At most `row_batch` rows run at once, fewer where their two d × d copies each would pass
    `max_bytes`.

    Equal to one `downdate` per step up to rounding, and fast: up to `row_batch` rows run at
    once, each with its own copy of G; the downdates of `block` steps are kept as low-rank
    factors (G_now = G - VᵀV), of which a step needs one column, and are applied together as one
    batched matrix product; then the removed coordinates are dropped from every row's arrays
    (all rows of a batch have removed equally many), so the work per step falls with the
    remaining coordinates. The copies live in two buffers allocated once (allocating large
    tensors over and over costs more than the arithmetic on a CPU).
    """
    rows, d = w.shape
    order = torch.empty(rows, n_prunable, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, n_prunable, dtype=w.dtype, device=w.device)
    trace = (torch.empty(rows, n_prunable + 1, d, dtype=w.dtype, device=w.device)
             if keep_weights else None)
    row_batch = max(1, min(row_batch, max_bytes // (2 * d * d * w.element_size())))
    n_batches = -(-rows // row_batch)
    size = -(-rows // n_batches)  # balanced batches
    bufs = (torch.empty(size * d * d, dtype=w.dtype, device=w.device),
            torch.empty(size * d * d, dtype=w.dtype, device=w.device))
    for r0 in range(0, rows, size):
        r1 = min(rows, r0 + size)
        out = _trace_rows(w[r0:r1], hinv, n_prunable, block, bufs, trace is not None)
        order[r0:r1], losses[r0:r1] = out[0], out[1]
        if trace is not None:
            trace[r0:r1] = out[2]
    return order, losses, trace


def _trace_rows(w: Tensor, hinv: Tensor, n_prunable: int, block: int,
                bufs: tuple[Tensor, Tensor], keep: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    nb, d = w.shape
    dev, dt = w.device, w.dtype
    b = torch.arange(nb, device=dev)
    w = w.clone()
    f = d  # coordinates still held per row
    g = bufs[0][: nb * d * d].view(nb, d, d)  # per row: the inverse as of the last flush
    g.copy_(hinv.expand(nb, d, d))
    idx = torch.arange(d, device=dev).expand(nb, d).contiguous()  # global column of each slot
    # diag of the current inverse, read as a score diag / w² (largest = least loss); fixed and
    # removed slots hold a negative value, so they are never chosen
    diag = g.diagonal(dim1=1, dim2=2).clone()
    diag[:, n_prunable:] = -1.0
    gone = torch.zeros(nb, d, dtype=torch.bool, device=dev)
    v = torch.empty(nb, block, d, dtype=dt, device=dev)
    order = torch.empty(nb, n_prunable, dtype=torch.long, device=dev)
    losses = torch.empty(nb, n_prunable, dtype=dt, device=dev)
    trace = torch.zeros(nb, n_prunable + 1, d, dtype=dt, device=dev) if keep else None
    if trace is not None:
        trace[:, 0] = w
    m = 0
    for step in range(n_prunable):
        p = (diag / w.square()).argmax(1)
        col = g[b, p, :]  # G is symmetric: row p = column p
        if m:
            col.sub_(torch.bmm(v[b, :m, p].unsqueeze(1), v[:, :m, :f]).squeeze(1))
        gpp = col[b, p]
        wp = w[b, p]
        losses[:, step] = wp.square() / (2 * gpp)
        order[:, step] = idx[b, p]
        w.addcmul_(col, (wp / gpp)[:, None], value=-1.0)
        w[b, p] = 0.0
        gone[b, p] = True
        col.mul_(gpp.rsqrt()[:, None])
        v[:, m, :f] = col
        diag.addcmul_(col, col, value=-1.0)
        diag[b, p] = -1.0
        m += 1
        if trace is not None:
            trace[b[:, None], step + 1, idx] = w.masked_fill(gone, 0.0)
        if m == block and step < n_prunable - 1:
            g.baddbmm_(v[:, :m, :f].transpose(1, 2), v[:, :m, :f], alpha=-1.0)
            m = 0
            # drop the removed slots: gather the kept rows into the other buffer, then the kept
            # columns back into this one
            fn = f - block
            sel = (~gone).nonzero()[:, 1].view(nb, fn)
            rows = (b[:, None] * f + sel).flatten()
            kept_rows = torch.index_select(g.view(nb * f, f), 0, rows,
                                           out=bufs[1][: nb * fn * f].view(nb * fn, f))
            g = torch.gather(kept_rows.view(nb, fn, f), 2, sel[:, None, :].expand(nb, fn, fn),
                             out=bufs[0][: nb * fn * fn].view(nb, fn, fn))
            f = fn
            w, idx = w.gather(1, sel), idx.gather(1, sel)
            gone = torch.zeros(nb, f, dtype=torch.bool, device=dev)
            diag = g.diagonal(dim1=1, dim2=2).clone()
            diag[idx >= n_prunable] = -1.0
    return order, losses, trace


def row_counts(losses: Tensor, k: int) -> Tensor:
    """Removals per row when the layer's k smallest per-step losses are taken (pooled over rows,
    ties by flat index): the non-uniform sparsity of OBC (methods.md §2.3)."""
    return k_smallest(losses, k).sum(1)


def optimal_rows(w: Tensor, h: Tensor, hinv: Tensor, removed: Tensor) -> Tensor:
    """The least-squares optimum of each row with the coordinates in `removed` (bool, rows × d)
    fixed at zero: min (ŵ - w)ᵀ H (ŵ - w). Solved on the smaller side: ŵ_F = H_FF⁻¹ (H w)_F when
    fewer coordinates remain than are removed, else ŵ = w - H⁻¹[:, S] (H⁻¹_SS)⁻¹ w_S."""
    out = w.clone()
    hw = w @ h
    for r in range(len(w)):
        s = removed[r]
        n_s = int(s.sum())
        if n_s == 0:
            continue
        f = ~s
        if int(f.sum()) <= n_s:
            keep = f.nonzero().flatten()
            row = torch.zeros_like(w[r])
            if len(keep):
                chol = torch.linalg.cholesky(h[keep][:, keep])
                row[keep] = torch.cholesky_solve(hw[r, keep, None], chol).flatten()
        else:
            gone = s.nonzero().flatten()
            chol = torch.linalg.cholesky(hinv[gone][:, gone])
            lam = torch.cholesky_solve(w[r, gone, None], chol).flatten()
            row = w[r] - hinv[:, gone] @ lam
            row[gone] = 0.0
        out[r] = row
    return out


def exact_obs(w: Tensor, h: Tensor, k: int, n_fixed: int = 0, row_batch: int = 128,
              block: int = 32) -> tuple[Tensor, Tensor]:
    """Exact row-wise OBS with a damped H (`damped`): greedy OBS with downdates on every
    row, the k smallest pooled per-step losses set each row's count, each row is the optimum
    with its first count removals at zero. Returns (Ŵ, removed mask)."""
    n_prunable = w.shape[1] - n_fixed
    h = positive_definite(h)
    hinv = inverse(h)
    order, losses, _ = obs_traces(w, hinv, n_prunable, row_batch, block)
    counts = row_counts(losses, k)
    steps = torch.arange(n_prunable, device=w.device)
    removed = torch.zeros_like(w, dtype=torch.bool)
    removed.scatter_(1, order, steps[None, :] < counts[:, None])
    return optimal_rows(w, h, hinv, removed), removed


# -- paper 001's approximate L-OBS ---------------------------------------------------------------

# after every `interval` prunes: (Ŵ, removed) -> (Ŵ after retraining, new H or None if unchanged)
ChunkHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def approx_lobs(w: Tensor, h: Tensor, k: int, interval: int, n_fixed: int = 0,
                on_chunk: ChunkHook | None = None, damp: float = 0.0,
                max_bytes: int = 8 << 30) -> tuple[Tensor, Tensor]:
    """Paper 001's simplified L-OBS: every `interval` pruned weights, the inverse Hessian of
    every row (over its remaining coordinates) is brought up to date and the saliencies
    w_rp² / (2 [G_r]_pp) of the whole layer ranked once; the next `interval` smallest are pruned
    in that order, each compensated with the row's inverse as of the chunk's start (stale within
    the chunk) and the row re-masked. `on_chunk` may retrain after each chunk and return a new
    (undamped) H, which is then damped with `damp` and inverted afresh per row; otherwise the
    inverses are downdated, which is exact and much cheaper than recomputing them.
    Every row holds its own d × d inverse at once (the ranking spans the layer): a layer that
    needs more than `max_bytes` for them is refused. Returns (Ŵ, removed mask)."""
    rows, d = w.shape
    need = rows * d * d * w.element_size()
    if need > max_bytes:
        raise ValueError(f"variant approx keeps one {d} x {d} inverse per row: {need / 2**30:.1f} "
                         f"GiB for this {rows}-row layer, over {max_bytes / 2**30:.0f} GiB; prune "
                         f"it with variant exact or sparsegpt")
    n_prunable = d - n_fixed
    w = w.clone()
    removed = torch.zeros_like(w, dtype=torch.bool)
    fixed = (torch.arange(d, device=w.device) >= n_prunable).expand(rows, d)
    inv = RowInverses(inverse(positive_definite(h)), rows)
    b = torch.arange(rows, device=w.device)
    done = 0
    while done < k:
        n = min(interval, k - done)
        score = torch.where(removed | fixed, math.inf, w.square() / (2 * inv.diagonals()))
        chosen = k_smallest(score, n)
        # rows are independent: round j applies every row's j-th choice (in ascending saliency)
        n_max = int(chosen.sum(1).max())
        seq = torch.argsort(torch.where(chosen, score, math.inf), dim=1, stable=True)[:, :n_max]
        valid = chosen.gather(1, seq)
        cols = inv.columns(seq, valid)  # (rows, n_max, d): stale columns, 0 where not valid
        for j in range(n_max):
            p = seq[:, j]
            gpp = torch.where(valid[:, j], cols[b, j, p], 1.0)
            w.addcmul_(cols[:, j], (w[b, p] / gpp)[:, None], value=-1.0)
            removed[b, p] |= valid[:, j]
            w.masked_fill_(removed, 0.0)
        done += n
        new_h = None
        if on_chunk is not None:
            w, new_h = on_chunk(w, removed)
            w = w.masked_fill(removed, 0.0)
        if done >= k:
            break
        if new_h is not None:
            inv.reset(positive_definite(damped(new_h, damp)), removed)
        else:
            inv.remove(seq, valid)
    return w, removed


class RowInverses:
    """For every row, the inverse of H over the row's remaining coordinates, as G0 - F Fᵀ: G0 is
    compacted to the row's slots (its f × f matrix at the front of the row's buffer; `pos[r]` the
    slot of each global column, -1 once compacted away) and F collects the factors of the
    removals since, until they are `block` columns wide and applied in one matrix product
    (as `obs_traces` does for one removal at a time)."""

    def __init__(self, hinv: Tensor, rows: int, block: int = 64) -> None:
        d = len(hinv)
        self.d, self.block = d, block
        self.buf = hinv.reshape(1, d * d).expand(rows, d * d).clone()
        self.slots = [torch.arange(d, device=hinv.device)] * rows  # global column of each slot
        self.pos = torch.arange(d, device=hinv.device).expand(rows, d).clone()
        self.factors: list[list[Tensor]] = [[] for _ in range(rows)]
        self.diag = [hinv.diagonal().clone() for _ in range(rows)]  # of G0 - F Fᵀ, per slot
        self.tmp = torch.empty(2, d * d, dtype=hinv.dtype, device=hinv.device)
        self.cols = torch.empty(0, dtype=hinv.dtype, device=hinv.device)
        self.cache: list[Tensor | None] = [None] * rows  # columns handed out by `columns`

    def g0(self, r: int) -> Tensor:
        f = len(self.slots[r])
        return self.buf[r, : f * f].view(f, f)

    def diagonals(self) -> Tensor:
        """(rows, d): each row's current inverse diagonal at its slots, inf elsewhere."""
        out = torch.full((len(self.slots), self.d), math.inf, dtype=self.buf.dtype,
                         device=self.buf.device)
        for r, slots in enumerate(self.slots):
            out[r, slots] = self.diag[r]
        return out

    def column_block(self, r: int, cols: Tensor) -> Tensor:
        """(f, n): row r's current inverse at columns `cols` (global indices), over its slots."""
        s = self.pos[r, cols]
        c = self.g0(r).index_select(0, s).T  # symmetric: rows = columns
        for fac in self.factors[r]:
            c = c - fac @ fac[s].T
        return c

    def columns(self, cols: Tensor, valid: Tensor) -> Tensor:
        """(rows, n, d): row r's current inverse columns cols[r, j] (global indices) embedded in
        d coordinates; zero where `valid` is False. Kept for `remove`."""
        rows, n = cols.shape
        if self.cols.numel() < rows * n * self.d:
            self.cols = torch.empty(rows * n * self.d, dtype=self.buf.dtype, device=self.buf.device)
        out = self.cols[: rows * n * self.d].view(rows, n, self.d)
        out.zero_()
        for r in range(rows):
            m = int(valid[r].sum())  # the valid choices come first in each row
            self.cache[r] = self.column_block(r, cols[r, :m]) if m else None
            if m:
                out[r, :m, self.slots[r]] = self.cache[r].T
        return out

    def remove(self, cols: Tensor, valid: Tensor) -> None:
        """Drop row r's columns cols[r][valid[r]] (those of the last `columns` call):
        G - G[:, S] (G_SS)⁻¹ G[S, :], the same as one `downdate` per column."""
        for r in range(len(self.slots)):
            c = self.cache[r]
            if c is None:
                continue
            s = self.pos[r, cols[r, : c.shape[1]]]
            chol = torch.linalg.cholesky(c[s])  # G_SS = L Lᵀ
            fac = torch.linalg.solve_triangular(chol, c.T, upper=False).T  # G[:, S] L⁻ᵀ
            self.factors[r].append(fac)
            self.diag[r] = self.diag[r] - fac.square().sum(1)
            self.pos[r, cols[r, : c.shape[1]]] = -1
            if sum(f.shape[1] for f in self.factors[r]) >= self.block:
                self._flush(r)
            self.cache[r] = None

    def _flush(self, r: int) -> None:
        """Apply row r's factors and compact its slots to the columns still held."""
        g, f = self.g0(r), len(self.slots[r])
        fac = torch.cat(self.factors[r], 1)
        g.addmm_(fac, fac.T, alpha=-1.0)
        keep = (self.pos[r, self.slots[r]] >= 0).nonzero().flatten()
        fn = len(keep)
        kept_rows = torch.index_select(g, 0, keep, out=self.tmp[0, : fn * f].view(fn, f))
        new = torch.index_select(kept_rows, 1, keep, out=self.tmp[1, : fn * fn].view(fn, fn))
        self._store(r, self.slots[r][keep], new)

    def reset(self, h: Tensor, removed: Tensor) -> None:
        """Fresh inverses of H restricted to each row's remaining coordinates."""
        for r in range(len(self.slots)):
            keep = (~removed[r]).nonzero().flatten()
            self._store(r, keep, inverse(h[keep][:, keep]))

    def _store(self, r: int, slots: Tensor, g: Tensor) -> None:
        f = len(slots)
        self.buf[r, : f * f].copy_(g.reshape(-1))
        self.slots[r] = slots
        self.pos[r] = -1
        self.pos[r, slots] = torch.arange(f, device=slots.device)
        self.factors[r] = []
        self.diag[r] = g.diagonal().clone()


# -- SparseGPT -----------------------------------------------------------------------------------


def sparsegpt(w: Tensor, h: Tensor, k: int, n_fixed: int = 0, block: int = 128
              ) -> tuple[Tensor, Tensor]:
    """SparseGPT (methods.md §2.4) with a damped H: columns in fixed order, the
    inverse's upper Cholesky factor U supplies each step's OBS row, and each block of `block`
    columns picks its mask from w² / U_jj² on the weights as updated so far. Blocks get
    floor(k · cumulative share) - previous, so the layer has exactly k zeros; the fixed (bias)
    columns come last and absorb every compensation. Returns (Ŵ, removed mask)."""
    rows, d = w.shape
    n_prunable = d - n_fixed
    u = torch.linalg.cholesky(inverse(positive_definite(h)), upper=True)
    w = w.clone()
    removed = torch.zeros_like(w, dtype=torch.bool)
    total = rows * n_prunable
    before = 0
    for i1 in range(0, n_prunable, block):
        i2 = min(i1 + block, n_prunable)
        quota = math.floor(k * (rows * i2) / total + 1e-9) - before if total else 0
        before += quota
        u1 = u[i1:i2, i1:i2]
        w1 = w[:, i1:i2].clone()
        mask1 = k_smallest(w1.square() / u1.diagonal().square()[None, :], quota)
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            q = torch.where(mask1[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        removed[:, i1:i2] = mask1
    return w, removed


# -- magnitude -----------------------------------------------------------------------------------


def magnitude(w: Tensor, k: int, n_fixed: int = 0) -> tuple[Tensor, Tensor]:
    """The k smallest |w| of the prunable columns set to zero, nothing compensated."""
    n_prunable = w.shape[1] - n_fixed
    removed = torch.zeros_like(w, dtype=torch.bool)
    removed[:, :n_prunable] = k_smallest(w[:, :n_prunable].abs(), k)
    return w.masked_fill(removed, 0.0), removed
