"""Speed of the layer-wise pruning variants: prune a trained LeNet-300-100 to 90 % with each
variant of `pruner=lobs` and print seconds per layer (Hessian included) and in total, on the CPU
and on CUDA when there is one.

    python -m bayes_prune.bench_lobs                       # CPU (and CUDA if present), 90 %
    python -m bayes_prune.bench_lobs --device cpu --threads 1 --variants exact
    python -m bayes_prune.bench_lobs --run RUN_DIR --sparsity 95   # another dense run, target

The trained network is the dense run of `experiment=lobs_lenet300_dense` (`--run`); when it is
not there, a LeNet-300-100 is trained for `--epochs` epochs first (pruning times do not depend
on how well it is trained). The calibration set, the damping and every other setting are the
`lobs` defaults, as in the experiment. The machine's load average is printed beside the times:
on a shared machine they are only comparable within one invocation.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from .config import DatasetConfig
from .data import load_data
from .evidence import evaluate
from .masks import global_sparsity, layer_sparsity, weight_masks
from .methods.lobs import LeNet300Config, LOBSConfig, Variant, build_lenet300_100, prune_layers
from .models import prunable_layers
from .run import load_model
from .trainer import make_optimizer, train_epoch

DENSE_RUN = "outputs/multirun/lobs_lenet300/mnist/lenet300_100/none/sparsity=0/seed=0"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def dense_model(run: str | None, data, epochs: int) -> tuple[torch.nn.Module, str]:
    path = Path(run or DENSE_RUN)
    if (path / "model.pt").exists():
        return load_model(path), f"the dense run {path}"
    if run:
        raise SystemExit(f"error: no finished run at {path} (model.pt missing)")
    torch.manual_seed(0)
    model = build_lenet300_100(LeNet300Config(), data.input_shape, data.num_classes)
    opt = make_optimizer(model, 1e-3, torch.device("cpu"), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_epoch(model, opt, data.x_train, data.y_train, 64, gen)
    return model, f"a LeNet-300-100 trained here for {epochs} epochs ({path} not found)"


def bench(model: torch.nn.Module, data, device: torch.device, variants: list[Variant],
          rate: float, calibration: int) -> None:
    # the calibration images a seed-0 run takes (phases.calibration_set)
    g = torch.Generator().manual_seed(2_000_003)
    x = data.x_train[torch.randperm(len(data.x_train), generator=g)[:calibration]]
    x, x_test, y_test = x.to(device), data.x_test.to(device), data.y_test.to(device)
    for variant in variants:
        net = copy.deepcopy(model).to(device)
        layers = prunable_layers(net, prune_output=True)
        cfg = LOBSConfig(variant=variant, calibration_size=calibration)
        before = loadavg()
        masks, rec = prune_layers(net, layers, x, rate, cfg, weight_masks(layers))
        _, correct = evaluate(net, x_test, y_test, 4096, lambda m, xb: m(xb))
        per_layer = "  ".join(f"{n}: {rec['layer_seconds'][n]:6.2f}" for n in layers)
        sparsity = layer_sparsity(layers)
        print(f"  {variant.value:9s}  total {rec['prune_seconds']:7.2f} s   per layer [{per_layer}]")
        print(f"             test acc {correct / len(y_test):.4f}   sparsity "
              f"{global_sparsity(layers):.4f} ({', '.join(f'{s:.3f}' for s in sparsity.values())})"
              f"   load {before} -> {loadavg()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help=f"a finished dense LeNet-300-100 run (default {DENSE_RUN})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, then CUDA when available")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--sparsity", type=float, default=90.0, help="per-layer target in percent")
    parser.add_argument("--variants", default="exact,approx,sparsegpt,magnitude")
    parser.add_argument("--calibration", type=int, default=LOBSConfig.calibration_size)
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs when no dense run is found")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [Variant(v) for v in args.variants.split(",")]
    devices = ([torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
               if args.device == "auto" else [torch.device(args.device)])
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here")
    root = os.environ.get("BAYES_PRUNE_DATA", "data")
    data = load_data(DatasetConfig(), root, torch.device("cpu"))
    model, source = dense_model(args.run, data, args.epochs)
    model.eval()
    print(f"pruning {source}\n  to {args.sparsity:g} % per layer (all 3 layers, 266,200 weights), "
          f"{args.calibration} calibration images, float64 Hessians;\n  torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"{device} ({name}):")
        bench(model, data, device, variants, args.sparsity / 100.0, args.calibration)


if __name__ == "__main__":
    main()
