"""The BMRS noise layer's training step on the CPU: a fused C kernel, built on first use.

`bmrs_kernel.c` is compiled once with the system C compiler (`cc`, about a second) into a cache
folder (`$BAYES_PRUNE_CACHE`, else `~/.cache/bayes_prune`) under a name that hashes its source
and flags, and loaded with ctypes. `available()` says whether that worked; where it does not (no
compiler, or not on the CPU) the noise layer uses the PyTorch ops of `truncnorm.inverse_cdf`,
which draw the same distribution from torch's generator.

The kernel's uniforms come from a counter-based hash keyed per call by a 64-bit key drawn from
torch's default generator, so a run is reproducible from its seed and resumes bit-identically
(the checkpoint holds that generator's state). On more than one torch thread a large activation
is split into fixed chunks run on a thread pool; the counters are global and the per-channel
gradient sums are added in chunk order, so the thread count changes no result.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("bayes_prune")

SOURCE = Path(__file__).with_name("bmrs_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_error: str | None = None

_P = ctypes.c_void_p  # tensors go in as their data pointers (ints)
_I = ctypes.c_int64
_C = ctypes.c_float

def cache_dir() -> Path:
    root = os.environ.get("BAYES_PRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bayes_prune")
    return Path(root)


def _cpu_fingerprint() -> bytes:
    """The CPU's architecture and feature flags: `-march=native` code built on one node of a
    cluster must not be loaded from a shared cache by a node with an older CPU (SIGILL)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}".encode()


def _build() -> Path:
    text = SOURCE.read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_fingerprint()).hexdigest()[:16]
    out = cache_dir() / f"bmrs_kernel_{digest}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)  # atomic: concurrent builds of the same source are harmless
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{compiler} failed: {exc.stderr.strip()[:300]}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason is in `error()`); built at most once per process."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            lib.bmrs_channel_params.argtypes = [_P, _P, _I, _C, _C, _C, _C, _P, _P, _P]
            lib.bmrs_chunk_grads.argtypes = [_P, _I, _P, _P, _I, _C, _C, _C, _C, _P, _P]
            lib.bmrs_noise_forward.argtypes = [_P, _P, _P, _P, _I, _I, _I, _P, _P, _C, _C, _C, _C, _C,
                                               ctypes.c_uint64, _I]
            lib.bmrs_noise_sums.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _P, _C, _C, _C,
                                            ctypes.c_uint64, _I, _P, _P, _P, _C, _C]
            lib.bmrs_uniform.argtypes = [_P, _I, ctypes.c_uint64]
            lib.bmrs_kl.argtypes = [_P, _P, _I, ctypes.c_double, _P, _P, _C, _C, _C, _C]
            lib.bmrs_kl.restype = ctypes.c_double
            lib.bmrs_kl_layers.argtypes = [_I, _P, _P, _P, _P, _P, _C, _C, _C, _C]
            lib.bmrs_kl_layers.restype = ctypes.c_double
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _error = f"{type(exc).__name__}: {exc}"
            log.warning("BMRS noise kernel unavailable (%s); using PyTorch ops", _error)
    return _lib


def available() -> bool:
    return library() is not None


def error() -> str | None:
    return _error


def draw_key() -> int:
    """A 64-bit key from torch's default CPU generator (so the run's seed fixes it)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & (2**64 - 1)


def uniforms(n: int, key: int) -> torch.Tensor:
    """The uniforms a forward call keyed `key` draws for its first `n` elements (memory order)."""
    lib = library()
    assert lib is not None, error()
    out = torch.empty(n, dtype=torch.float32)
    lib.bmrs_uniform(out.data_ptr(), n, key)
    return out


def channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def to_block(x: torch.Tensor, last: bool) -> tuple[torch.Tensor, int, int, int]:
    """x as a contiguous [outer, C, inner] block, channel = dim 1 of x, and (outer, C, inner):
    a view for [B, C], contiguous NCHW and (`last`) channels-last NCHW tensors."""
    c = x.shape[1]
    if last:
        flat = x.permute(0, 2, 3, 1).contiguous()
        return flat, flat.numel() // c, c, 1
    x = x.contiguous()
    return x, x.shape[0], c, x.numel() // max(1, x.shape[0] * c)


def from_block(flat: torch.Tensor, shape: torch.Size, last: bool) -> torch.Tensor:
    if last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


CHUNK = 1 << 16  # elements per chunk of the gradient sums: fixed, so no result depends on the threads
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


def chunk_rows(row: int) -> int:
    """Outer rows (`row` elements each) per chunk: about CHUNK elements, in a multiple of 16 rows so
    that every chunk starts 64-byte aligned, as the vector loops want."""
    return max(16, CHUNK // max(1, row) // 16 * 16)


def threads_for(outer: int, step: int) -> int:
    """Threads for a tensor of `outer` rows in chunks of `step` rows: torch's intra-op count, at
    most one per chunk."""
    return min(torch.get_num_threads(), -(-outer // step))


def run_split(fn, outer: int, step: int, threads: int) -> None:
    """fn(start, stop) over [0, outer) split at multiples of `step` into `threads` ranges, run on a
    thread pool (the ctypes calls release the GIL)."""
    global _pool
    n_chunks = -(-outer // step)
    bounds = [min(outer, step * (n_chunks * t // threads)) for t in range(threads + 1)]
    if _pool is None or _pool[0] < threads:
        _pool = (threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bmrs_kernel"))
    list(_pool[1].map(lambda t: fn(bounds[t], bounds[t + 1]), range(threads)))


class FusedNoise(torch.autograd.Function):
    """y = x * exp(u), u ~ N(mu, sigma^2) truncated to [a, b] drawn per element (bmrs_kernel.c), with
    sigma = exp(clamp(logsigma, *ls_range)); differentiable in x, mu and logsigma."""

    @staticmethod
    def forward(ctx, x, mu, logsigma, a: float, b: float, ls_range: tuple[float, float], clip: float,
                scratch: dict | None = None):
        key = draw_key()
        last = channels_last(x)
        xf, outer, c, inner = to_block(x, last)
        yf, zq = torch.empty_like(xf), _quantile_buffer(ctx, scratch, xf)
        cp = torch.empty(3 * c)  # per channel sigma, Phi(alpha), Z: computed once, used twice
        row, step = c * inner, chunk_rows(c * inner)
        threads = threads_for(outer, step)
        # mu, logsigma: 1-d parameters, contiguous; float32 element offsets are 4 bytes apart
        if threads == 1:
            _lib.bmrs_noise_forward(xf.data_ptr(), yf.data_ptr(), zq.data_ptr(), cp.data_ptr(), outer, c,
                                    inner, mu.data_ptr(), logsigma.data_ptr(), a, b, *ls_range, clip, key, 0)
        else:
            _lib.bmrs_channel_params(mu.data_ptr(), logsigma.data_ptr(), c, a, b, *ls_range, cp.data_ptr(),
                                     cp.data_ptr() + 4 * c, cp.data_ptr() + 8 * c)
            run_split(lambda o0, o1: _lib.bmrs_noise_forward(
                xf.data_ptr() + 4 * o0 * row, yf.data_ptr() + 4 * o0 * row, zq.data_ptr() + 4 * o0 * row,
                cp.data_ptr(), o1 - o0, c, inner, mu.data_ptr(), None, a, b, *ls_range, clip, key, o0 * row),
                outer, step, threads)
        ctx.save_for_backward(xf, zq, cp, mu, logsigma)
        ctx.meta = (outer, c, inner, a, b, ls_range, clip, key, x.shape, last)
        return from_block(yf, x.shape, last)

    @staticmethod
    def backward(ctx, gy):
        xf, zq, cp, mu, logsigma = ctx.saved_tensors
        outer, c, inner, a, b, ls_range, clip, key, shape, last = ctx.meta
        gyf = to_block(gy, last)[0]
        gx, gmu, gls = torch.empty_like(xf), torch.empty_like(mu), torch.empty_like(logsigma)
        row, step = c * inner, chunk_rows(c * inner)
        threads = threads_for(outer, step)
        if threads == 1:  # one call: the chunk sums, added in chunk order, and the gradients
            _lib.bmrs_noise_sums(gyf.data_ptr(), xf.data_ptr(), zq.data_ptr(), cp.data_ptr(), gx.data_ptr(),
                                 None, outer, step, c, inner, mu.data_ptr(), a, b, clip, key, 0,
                                 gmu.data_ptr(), gls.data_ptr(), logsigma.data_ptr(), *ls_range)
        else:
            sums = torch.empty(-(-outer // step), 4 * c, dtype=torch.float64)
            run_split(lambda o0, o1: _lib.bmrs_noise_sums(
                gyf.data_ptr() + 4 * o0 * row, xf.data_ptr() + 4 * o0 * row, zq.data_ptr() + 4 * o0 * row,
                cp.data_ptr(), gx.data_ptr() + 4 * o0 * row, sums.data_ptr() + 32 * c * (o0 // step),
                o1 - o0, step, c, inner, mu.data_ptr(), a, b, clip, key, o0 * row, None, None, None,
                *ls_range), outer, step, threads)
            _lib.bmrs_chunk_grads(sums.data_ptr(), len(sums), mu.data_ptr(), logsigma.data_ptr(), c, a, b,
                                  *ls_range, gmu.data_ptr(), gls.data_ptr())
        if ctx.scratch is not None:
            ctx.scratch["holder"] = None  # the quantile buffer is free for the next forward
        return from_block(gx, shape, last), gmu, gls, None, None, None, None, None


def _quantile_buffer(ctx, scratch: dict | None, like: torch.Tensor) -> torch.Tensor:
    """The buffer the forward keeps its quantiles in until the backward: the layer's own (`scratch`)
    when no other pending backward holds it, so that steady-state training does not allocate (and
    page-fault) an activation-sized buffer every step; else a fresh one."""
    ctx.scratch = None
    if scratch is not None:
        holder = scratch.get("holder")
        buf = scratch.get("buffer")
        if (holder is None or holder() is None) and buf is not None and buf.shape == like.shape:
            scratch["holder"] = weakref.ref(ctx)
            ctx.scratch = scratch
            return buf
        if holder is None or holder() is None:
            scratch["buffer"], scratch["holder"] = torch.empty_like(like), weakref.ref(ctx)
            ctx.scratch = scratch
            return scratch["buffer"]
    return torch.empty_like(like)


class FusedKL(torch.autograd.Function):
    """sum_l weight_l * sum_units KL(q||p) over layers given as (mu_1, logsigma_1, mu_2, ...)."""

    @staticmethod
    def forward(ctx, weights: tuple[float, ...], a: float, b: float, ls_range: tuple[float, float],
                *params):
        n = len(weights)
        counts = [p.numel() for p in params[0::2]]
        grads = torch.empty(2 * sum(counts), dtype=torch.float32)
        total = _lib.bmrs_kl_layers(
            n, (ctypes.c_void_p * n)(*[p.data_ptr() for p in params[0::2]]),
            (ctypes.c_void_p * n)(*[p.data_ptr() for p in params[1::2]]), (ctypes.c_int64 * n)(*counts),
            (ctypes.c_double * n)(*weights), grads.data_ptr(), a, b, *ls_range)
        ctx.grads = grads.split([c for count in counts for c in (count, count)])
        return torch.tensor(total, dtype=params[0].dtype)

    @staticmethod
    def backward(ctx, g):
        scale = float(g)
        grads = ctx.grads if scale == 1.0 else [scale * t for t in ctx.grads]
        return (None, None, None, None, *grads)
