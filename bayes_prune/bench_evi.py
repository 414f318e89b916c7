"""Speed and memory of eVI training (paper 003): seconds per MNIST epoch and peak memory of
`model=evi_cnn` with full and diagonal covariance, and of the vanilla twin, at several batch sizes.

    python -m bayes_prune.bench_evi                         # CPU: batch 1 and 16, N = 100
    python -m bayes_prune.bench_evi --device cuda --batch 16 64 256
    python -m bayes_prune.bench_evi --covariance full naive --batch 4 --no-vanilla

`naive` runs the full rule on materialised per-channel blocks (N x 576 x 576 per example after
the convolution), what the low-rank factor of `evi.py` avoids. Each configuration runs in a fresh
process: the trainer's epoch (`trainer.train_epoch` with the
method's ELBO and KL, fused Adam) over the first `--examples` MNIST training images (the real
images when `BAYES_PRUNE_DATA` has them, random ones of MNIST's shape otherwise), after a warm-up.
Seconds per epoch are that time scaled to 60,000 images. Peak memory is the process's peak
resident set during training minus its size before the model was built (Linux: VmHWM after a
reset), or the peak allocated device memory (CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MNIST_TRAIN = 60_000


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(li for li in f if li.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _images(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from .config import DatasetConfig
    from .data import load_data

    root = os.environ.get("BAYES_PRUNE_DATA", "data")
    try:
        data = load_data(DatasetConfig(train_subset=n, test_subset=1), root, device)
        return data.x_train, data.y_train
    except Exception:  # noqa: BLE001 - no MNIST here: random images of its shape time the same
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, 1, 28, 28, generator=g).to(device),
                torch.randint(10, (n,), generator=g).to(device))


def measure(model: str, covariance: str, batch: int, kernels: int, examples: int,
            device: str, threads: int) -> dict:
    """One configuration, in this process."""
    from .config import Config, DatasetConfig
    from .evi import FullCov
    from .methods.base import Step
    from .methods.self_compress import (
        Covariance,
        EVICNNConfig,
        SelfCompress,
        SelfCompressConfig,
        VanillaCNNConfig,
    )
    from .trainer import make_optimizer, train_epoch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    x, y = _images(examples, dev)
    before = _status_mb("VmRSS")
    _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    naive = covariance == "naive"
    cov = Covariance.full if naive else Covariance(covariance) if model == "evi_cnn" else None
    cfg = EVICNNConfig(kernels=kernels, covariance=cov) if cov else VanillaCNNConfig(kernels=kernels)
    method = SelfCompress(SelfCompressConfig(), Config(dataset=DatasetConfig()))
    torch.manual_seed(0)
    net = method.build_model(cfg, (1, 28, 28), 10).to(dev)
    if naive:  # the same rules on materialised (N x 576 x 576) blocks: what the factor avoids
        net.conv.register_forward_hook(lambda mod, inp, out: (out[0], FullCov(out[1].dense())))
    opt = make_optimizer(net, 1e-4, dev)
    gen = torch.Generator().manual_seed(0)

    def extra(xb, yb):
        return method.penalty(net, Step(xb, yb, 1, None, MNIST_TRAIN))  # type: ignore[arg-type]

    def epoch(n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        train_epoch(net, opt, x[:n], y[:n], batch, gen, method.loss, extra_loss=extra)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    epoch(min(examples, 4 * batch))  # warm-up
    seconds = epoch(examples)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else _status_mb("VmHWM") - before)
    return {"model": model, "covariance": covariance if model == "evi_cnn" else "-",
            "batch": batch, "kernels": kernels, "examples": examples, "device": device,
            "threads": threads, "seconds": seconds,
            "seconds_per_epoch": seconds / examples * MNIST_TRAIN, "peak_mb": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--covariance", nargs="+", default=["full", "diagonal"],
                    help="full, diagonal, naive (full on materialised blocks)")
    ap.add_argument("--kernels", type=int, default=100)
    ap.add_argument("--examples", type=int, default=None,
                    help="images timed per configuration (default: 800 x batch, at most 60,000)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--vanilla", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON configuration run in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return []
    configs = [("evi_cnn", c, b) for b in args.batch for c in args.covariance]
    if args.vanilla:
        configs += [("vanilla_cnn", "-", b) for b in args.batch]
    rows = []
    print(f"# torch {torch.__version__}, device {args.device}, {args.threads} threads, "
          f"N = {args.kernels} kernels; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'model':12s} {'covariance':10s} {'batch':>5s} {'s/epoch':>9s} {'peak MB':>9s}",
          flush=True)
    for model, cov, batch in configs:
        examples = args.examples or min(MNIST_TRAIN, 800 * batch)
        one = json.dumps({"model": model, "covariance": cov, "batch": batch,
                          "kernels": args.kernels, "examples": examples, "device": args.device,
                          "threads": args.threads})
        out = subprocess.run([sys.executable, "-m", "bayes_prune.bench_evi", "--one", one],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model:12s} {cov:10s} {batch:5d}   failed: {out.stderr.strip()[-300:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{model:12s} {cov:10s} {batch:5d} {row['seconds_per_epoch']:9.1f} "
              f"{row['peak_mb']:9.0f}", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()
