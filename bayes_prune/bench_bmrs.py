"""BMRS benchmarks: the cut network against the dense one, and the cost of continuous pruning.

    python -m bayes_prune.bench_bmrs cut RUN_DIR [RUN_DIR ...] [--batches 1 256] [--repeats 30]
    python -m bayes_prune.bench_bmrs overhead [--blocks mnist_mlp ...] [--epochs 3] [--kernels c torch scale]
                                              [--device cuda] [--set KEY=VALUE ...]
    python -m bayes_prune.bench_bmrs export RUN_DIR OUT.pt

`cut`: for each finished run, its final network (`run.load_model`: the pruned units cut out,
noise layers sliced) exported to a plain Linear/Conv2d network (`bmrs_layers.export`: E[theta]
folded into the next layer), against the dense network of the same model config (no noise
layers), as a deployment would compare them: parameters, bytes of the saved state_dict, MACs per
example, and inference latency (median over repeats, the two networks timed alternately, one
CPU thread, eval mode, no grad) per batch size. It also checks that the export gives the final
network's outputs on test-shaped inputs.

`overhead`: for each paper block, one training epoch with continuous BMRS_N pruning (noise layers,
KL penalty, ΔF and the masks after the epoch: `RunState.train_epoch` + `Method.epoch_end`, what a
run does) against one epoch of the same network without noise layers (`bmrs_none`), on the
block's real data and batch size, alternating the two `--epochs` times in one process; the median
ratio is the overhead. With `--kernels c torch` it also times the noise layer on PyTorch ops;
`scale` is the floor of any multiplicative unit layer: the same run with each noise layer
replaced by x * exp(mu), a learned per-unit scale (one differentiable broadcast multiply per
layer, plus the KL, ΔF and masks), so the cost of sampling is the difference between `c` and
`scale`.

Both print Markdown and write JSON (`--out`), with the load average before and after: timings on
a shared machine are only comparable within one invocation.

`export`: saves the run's exported network (an nn.Sequential of torch.nn's Linear, Conv2d,
activation, pooling and Flatten layers only: the pruned units cut out, E[theta] folded in), so that
`torch.load(OUT.pt, weights_only=False)` runs it without this package.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .bmrs_layers import LogUniformNoise, export, noise_layers
from .metrics import layer_macs

ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, timed in turn (ABAB...) after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_cut(run_dirs: list[Path], batches: list[int], repeats: int) -> list[dict]:
    from .config import from_dict
    from .models import build_model
    from .run import load_model

    rows = []
    for run_dir in run_dirs:
        record = json.loads((run_dir / "metrics.json").read_text())
        arch = record["final"]["architecture"]
        shape, classes = tuple(arch["input_shape"]), arch["num_classes"]
        cfg = from_dict(record["config"])
        final = load_model(run_dir).eval()
        cut = export(final).eval()
        dense = build_model(cfg.model, shape, classes).eval()
        fmt = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in dense.modules()) else None
        if fmt is not None:
            final, cut, dense = (m.to(memory_format=fmt) for m in (final, cut, dense))
        x = torch.randn(64, *shape)
        with torch.no_grad():
            max_diff = float((cut(x) - final(x)).abs().max())
        row = {"run": str(run_dir), "pruner": record["config"]["pruner"]["name"],
               "dataset": record["config"]["dataset"]["name"], "model": record["config"]["model"]["name"],
               "widths": arch["widths"], "export_vs_final_max_abs_diff": max_diff,
               "params_dense": sum(p.numel() for p in dense.parameters()),
               "params_cut": sum(p.numel() for p in cut.parameters()),
               "bytes_dense": saved_bytes(dense), "bytes_cut": saved_bytes(cut),
               "macs_dense": sum(layer_macs(dense, shape).values()),
               "macs_cut": sum(layer_macs(cut, shape).values()), "latency": {}}
        for b in batches:
            xb = torch.randn(b, *shape)
            if fmt is not None:
                xb = xb.contiguous(memory_format=fmt)
            t = latency({"dense": dense, "cut": cut}, xb, repeats)
            row["latency"][b] = {"dense_ms": 1e3 * t["dense"], "cut_ms": 1e3 * t["cut"],
                                 "speedup": t["dense"] / t["cut"]}
        rows.append(row)
    return rows


def cut_markdown(rows: list[dict]) -> str:
    lines = ["| run | params dense → cut | bytes dense → cut | MACs dense → cut | batch | latency dense → "
             "cut (ms) | speed-up | export = final (max abs diff) |", "|---|---|---|---|---:|---|---:|---|"]
    for r in rows:
        name = f"{r['dataset']} {r['model']} {r['pruner']} ({Path(r['run']).name})"
        for i, (b, t) in enumerate(r["latency"].items()):
            head = (f"| {name} | {r['params_dense']:,} → {r['params_cut']:,} | {r['bytes_dense']:,} → "
                    f"{r['bytes_cut']:,} | {r['macs_dense']:,} → {r['macs_cut']:,} |") if i == 0 else \
                "| | | | |"
            lines.append(f"{head} {b} | {t['dense_ms']:.3f} → {t['cut_ms']:.3f} | {t['speedup']:.2f}x | "
                         + (f"{r['export_vs_final_max_abs_diff']:.1e} |" if i == 0 else " |"))
    return "\n".join(lines) + "\n"


def block_state(block: str, pruner: str, overrides: list[str], device: str = "cpu"):
    """A RunState of the paper block's experiment with `pruner`, on its real data."""
    from hydra import compose, initialize_config_dir

    from .config import register_configs, validate
    from .data import load_data
    from .methods import method_class
    from .run import RunState

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[
            f"experiment=bmrs_{block}", f"pruner={pruner}", f"trainer.threads={torch.get_num_threads()}",
            *overrides]))
    method = method_class(cfg.pruner.method)(cfg.pruner, cfg)
    torch.manual_seed(0)
    data = load_data(cfg.dataset, cfg.paths.data_dir, torch.device(device))
    state = RunState(cfg, method, data, torch.device(device))
    method.start(state)
    return state


def bench_overhead(blocks: list[str], epochs: int, kernels: list[str], overrides: list[str],
                   device: str = "cpu", threads: int = 1) -> list[dict]:
    from .config import Phase

    torch.set_num_threads(threads)
    rows = []
    for block in blocks:
        runs = {"none": block_state(block, "bmrs_none", overrides, device)}
        for k in kernels:
            kernel = "torch" if k == "torch" else "auto"
            state = block_state(block, "bmrs_n", [*overrides, f"pruner.kernel={kernel}"], device)
            if k == "scale":
                for layer in noise_layers(state.model).values():
                    layer.forward = _scale_forward(layer)
            runs[f"bmrs_n[{k}]"] = state
        times: dict[str, list[float]] = {k: [] for k in runs}
        for epoch in range(1, epochs + 1):
            for name, state in runs.items():
                sync(device)
                t0 = time.perf_counter()
                state.train_epoch(epoch, Phase.train)
                state.method.epoch_end(state, epoch)
                sync(device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"block": block, "epochs": epochs, "seconds": times, "median_seconds": med,
                     "overhead": {k: med[k] / med["none"] - 1 for k in med if k != "none"},
                     "batch_size": runs["none"].cfg.trainer.batch_size, "device": device, "threads": threads,
                     "n_train": len(runs["none"].data.x_train)})
    return rows


def _scale_forward(layer: LogUniformNoise):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * layer.mu.exp().view((1, -1) + (1,) * (x.dim() - 2))
    return forward


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def overhead_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0]["median_seconds"] if k != "none"] if rows else []
    lines = ["| block | batch | epoch without noise (s) | " + " | ".join(
        f"{k} epoch (s) | overhead" for k in keys) + " |", "|---|---:|---:|" + "---:|---:|" * len(keys)]
    for r in rows:
        med = r["median_seconds"]
        lines.append(f"| {r['block']} | {r['batch_size']} | {med['none']:.2f} | " + " | ".join(
            f"{med[k]:.2f} | {100 * r['overhead'][k]:+.0f} %" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bayes_prune.bench_bmrs",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cut", help="cut network vs dense: size, MACs, inference latency")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    c.add_argument("--repeats", type=int, default=30)
    o = sub.add_parser("overhead", help="epoch time with continuous BMRS_N vs without noise layers")
    o.add_argument("--blocks", nargs="+", default=["mnist_mlp", "fashion_mnist_mlp", "mnist_lenet5",
                                                   "fashion_mnist_lenet5"])
    o.add_argument("--epochs", type=int, default=3)
    o.add_argument("--kernels", nargs="+", choices=["c", "torch", "scale"], default=["c"],
                   help="c: the fused CPU kernel where it applies (on CUDA the layer uses PyTorch ops); "
                        "torch: PyTorch ops; scale: x * exp(mu), no sampling (the floor)")
    o.add_argument("--device", default="cpu", help="cpu or cuda")
    o.add_argument("--threads", type=int, default=1, help="torch CPU threads (the kernel's too)")
    o.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="Hydra overrides for every run, e.g. dataset.train_subset=12000")
    for p in (c, o):
        p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    e = sub.add_parser("export", help="save the run's cut network as a plain torch.nn module")
    e.add_argument("run", type=Path)
    e.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.what == "export":
        from .run import load_model

        plain = export(load_model(args.run)).eval()
        args.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(plain, args.path)
        print(f"wrote {args.path}: {plain}")
        return 0
    torch.set_num_threads(1)
    before = loadavg()
    if args.what == "cut":
        rows = bench_cut(args.runs, args.batches, args.repeats)
        text = cut_markdown(rows)
    else:
        os.environ.setdefault("BAYES_PRUNE_DATA", str(ROOT.parent / "shared" / "datasets"))
        rows = bench_overhead(args.blocks, args.epochs, args.kernels, args.overrides, args.device,
                              args.threads)
        text = overhead_markdown(rows)
    after = loadavg()
    print(text)
    threads = getattr(args, "threads", 1)
    print(f"{threads} thread(s); load average before {before}, after {after}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"what": args.what, "load_before": before, "load_after": after,
                                        "torch": torch.__version__, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
