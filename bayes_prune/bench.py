"""Benchmark the hot path against a plain PyTorch loop, in one process.

    python -m bayes_prune.bench [--models fcn cnn] [--n-train 60000] [--repeats 3]
    python -m bayes_prune.bench --device cuda [--fleet-sizes 1 21 105] [--fleet-modes eager graph]

For each model: (a) one epoch of a plain loop (torchvision's MNIST Dataset with ToTensor and
Normalize, DataLoader(batch_size=64, shuffle=True), torch.optim.Adam, the same model), (b) one epoch
of our trainer with persistent masks at 90 % sparsity and the posterior objective (the work a
Bayes-pruning run really does), and (c) our evidence pass (two full no-grad passes over the
training set: before and after a candidate prune).
(a') is the same loop over pre-normalised tensors in a minimal Dataset, the lighter plain variant.
Prints seconds per epoch, the ratios (a)/(b) and (a')/(b), and the evidence pass as a fraction of our epoch.
Uses MNIST from BAYES_PRUNE_DATA when it is there, else random uint8 images of the same shape.

On CUDA it times what a run and a fleet really do, through `RunState` and `Stack`, at 90 %
persistent magnitude sparsity with the posterior objective: a single run's training epoch and its
evidence pass (two passes), eager and replayed from CUDA graphs, and a fleet's training epoch and
evidence pass per model at each fleet size K, eager and graphed, beside the fp32 compute limit
(6 x dense MACs x examples per model-epoch, over the device's fp32 peak: SMs x fp32 lanes x 2 x
clock). The first epoch of each (graph capture, autotuning) is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .config import (
    Config,
    CudaGraph,
    DatasetConfig,
    DatasetName,
    Phase,
    PriorConfig,
    SparsityConfig,
    TrainerConfig,
)
from .data import Data, DataError, load_data
from .evidence import Evidence, add_prior_grad_
from .masks import GradMasker, apply_masks, zero_optimizer_state
from .methods.bayes_factor import Gate, MagnitudeConfig, MagnitudePruning, magnitude_mask
from .metrics import DenseReference
from .models import CNNConfig, FCNConfig, build_model, eval_batch_size, prunable_layers, weight_layers
from .run import RunState
from .stacked import Stack
from .trainer import make_optimizer, train_epoch

MNIST_NORMALISE = ((0.1307,), (0.3081,))


class TensorImages(Dataset):
    """The lighter plain variant: pre-normalised tensors in memory, one sample per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class SyntheticMNIST(Dataset):
    """Stands in for torchvision's MNIST when it is not on disk: uint8 images in memory, turned into
    normalised tensors one sample at a time through PIL and the same transforms."""

    def __init__(self, n: int, transform) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        self.targets = torch.randint(10, (n,), generator=g)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.data[i].numpy(), mode="L")
        return self.transform(img), int(self.targets[i])


def plain_dataset(root: str, n: int) -> tuple[Dataset, str]:
    """What a plain PyTorch script uses: torchvision's MNIST with ToTensor and Normalize."""
    transform = T.Compose([T.ToTensor(), T.Normalize(*MNIST_NORMALISE)])
    try:
        ds = torchvision.datasets.MNIST(root, train=True, download=False, transform=transform)
        return Subset(ds, range(min(n, len(ds)))), f"torchvision MNIST from {root}"
    except RuntimeError:
        return SyntheticMNIST(n, transform), "random uint8 MNIST-shaped images"


def plain_epoch(model, dataset: Dataset) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    model.train()
    t0 = time.perf_counter()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - t0


def our_epoch(model, x, y, device) -> tuple[float, float]:
    """Seconds for one training epoch and for one evidence pass (before + after a prune)."""
    opt = make_optimizer(model, 1e-3, device)
    layers = prunable_layers(model, prune_output=False)
    weights = [m.weight for m in weight_layers(model).values()]
    masks = {f"{n}.weight": magnitude_mask(m.weight, 0.9) for n, m in layers.items()}
    apply_masks(model, masks)
    zero_optimizer_state(opt, model, masks)
    masker, prior = GradMasker(model, masks), PriorConfig()

    def before_step() -> None:
        masker()
        add_prior_grad_(weights, prior, len(x))

    t0 = time.perf_counter()
    train_epoch(model, opt, x, y, 64, torch.Generator().manual_seed(0), before_step=before_step)
    t_train = time.perf_counter() - t0
    evidence = Evidence(x, y, eval_batch_size(model, device, None), None, 0)
    t0 = time.perf_counter()
    evidence.log_likelihood(model)
    evidence.log_likelihood(model)
    return t_train, time.perf_counter() - t0


def our_data(root: str, n: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        data = load_data(DatasetConfig(name=DatasetName.mnist), root, torch.device("cpu"), channels_last)
        return data.x_train[:n], data.y_train[:n]
    except DataError:
        ds = SyntheticMNIST(n, None)
        x = ((ds.data.float() / 255 - MNIST_NORMALISE[0][0]) / MNIST_NORMALISE[1][0]).unsqueeze(1)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), ds.targets


# fp32 lanes per SM by compute capability (CUDA C Programming Guide, arithmetic throughput table)
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64}


def fp32_peak(device: torch.device) -> tuple[float, str]:
    """The device's fp32 peak in FLOP/s (FMA = 2 FLOPs) and how it was computed."""
    props = torch.cuda.get_device_properties(device)
    lanes = FP32_LANES.get((props.major, props.minor), 128)
    ghz = props.clock_rate / 1e6
    peak = props.multi_processor_count * lanes * 2 * ghz * 1e9
    return peak, f"{props.multi_processor_count} SMs x {lanes} fp32 lanes x 2 x {ghz:.2f} GHz"


def bench_config(name: str, device: torch.device, graph: bool, seed: int) -> Config:
    return Config(dataset=DatasetConfig(name=DatasetName.mnist),
                  model=FCNConfig() if name == "fcn" else CNNConfig(),
                  pruner=MagnitudeConfig(name="bayes_magnitude", gate=Gate.lagged),
                  sparsity=SparsityConfig(percent=90.0),
                  trainer=TrainerConfig(device=str(device),
                                        cuda_graph=CudaGraph.on if graph else CudaGraph.off),
                  seed=seed)


def bench_run(name: str, data: Data, device: torch.device, graph: bool, seed: int) -> RunState:
    """A run state as a Bayes-magnitude run holds it after its first prune (90 %, persistent)."""
    cfg = bench_config(name, device, graph, seed)
    method = MagnitudePruning(cfg.pruner, cfg)
    torch.manual_seed(seed)
    run = RunState(cfg, method, data, device)
    method.start(run)
    run.set_masks({f"{n}.weight": magnitude_mask(m.weight, 0.9) for n, m in run.prunable.items()})
    return run


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_main(args, device: torch.device) -> None:
    root = os.environ.get("BAYES_PRUNE_DATA", "data")
    peak, how = fp32_peak(device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, fp32 peak "
          f"{peak / 1e12:.1f} TFLOP/s ({how}); median of {args.repeats} epochs after an untimed one")
    shape = tuple(args.shape)
    for name in args.models:
        if shape == (1, 28, 28):
            x, y = our_data(root, args.n_train, channels_last=name == "cnn")
            source = "MNIST-shaped"
        else:  # e.g. CIFAR-10's 3x32x32, which is timed on random images of its shape
            g = torch.Generator().manual_seed(0)
            x = torch.randn((args.n_train, *shape), generator=g)
            y = torch.randint(10, (args.n_train,), generator=g)
            x = x.contiguous(memory_format=torch.channels_last) if name == "cnn" else x
            source = f"random {'x'.join(map(str, shape))}"
        data = Data(x.to(device), y.to(device), x[:10000].to(device), y[:10000].to(device), 10)
        model = build_model(FCNConfig() if name == "fcn" else CNNConfig(), shape, 10)
        macs = sum(DenseReference.of(model, shape).macs.values())
        limit = 6 * macs * len(x) / peak
        print(f"{name}: {len(x)} {source} examples, 90 % persistent magnitude sparsity, posterior "
              f"objective; fp32 compute limit {limit:.4f} s per model-epoch (6 x {macs / 1e6:.2f}M MACs "
              f"x examples)")
        for graph in (False, True):
            label = "CUDA graph" if graph else "eager"
            run = bench_run(name, data, device, graph, 0)
            t_train = timed(lambda r=run: r.train_epoch(1, Phase.train), args.repeats)
            t_ev = timed(lambda r=run: [r.method.evidence.log_likelihood(r.model) for _ in range(2)],
                         args.repeats)
            print(f"  single run, {label:10s} {t_train:8.3f} s/epoch + evidence {t_ev:.3f} s (2 passes) "
                  f"= {t_train + t_ev:.3f} s per epoch")
            del run
        for k in args.fleet_sizes:
            for graph in [m == "graph" for m in args.fleet_modes]:
                label = "CUDA graph" if graph else "eager"
                runs = [bench_run(name, data, device, False, seed) for seed in range(k)]
                stack = Stack(runs, graph)
                members, evidences = list(range(k)), [r.method.evidence for r in runs]
                t_train = timed(stack.train_epoch, args.repeats) / k
                t_ev = timed(lambda s=stack, m=members, e=evidences: [s.log_likelihood(m, e)
                                                                      for _ in range(2)], args.repeats) / k
                print(f"  fleet K={k:<4d} {label:10s} {t_train:8.4f} s per model-epoch + evidence "
                      f"{t_ev:.4f} s = {t_train + t_ev:.4f} s; training at {t_train / limit:.1f}x the "
                      f"compute limit")
                del runs, stack
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcn", "cnn"], choices=["fcn", "cnn"])
    parser.add_argument("--n-train", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each; medians are reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fleet-sizes", nargs="+", type=int, default=[1, 21, 105],
                        help="fleet sizes K timed on CUDA")
    parser.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"),
                        help="input shape on CUDA: 1 28 28 is MNIST, 3 32 32 random CIFAR-10-shaped images")
    parser.add_argument("--fleet-modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"],
                        help="fleet training modes timed on CUDA")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: no CUDA device is available here")
        cuda_main(args, torch.device("cuda"))
        return
    device = torch.device("cpu")
    root = os.environ.get("BAYES_PRUNE_DATA", "data")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, "
          f"median of {args.repeats} epochs each, interleaved")
    for name in args.models:
        dataset, source = plain_dataset(root, args.n_train)
        x, y = our_data(root, args.n_train, channels_last=name == "cnn")
        cfg = FCNConfig() if name == "fcn" else CNNConfig()
        plain, tensors, ours, evidence = [], [], [], []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            plain.append(plain_epoch(build_model(cfg, (1, 28, 28), 10), dataset))
            torch.manual_seed(0)
            tensors.append(plain_epoch(build_model(cfg, (1, 28, 28), 10),
                                       TensorImages(x.contiguous(), y)))
            torch.manual_seed(0)
            model = build_model(cfg, (1, 28, 28), 10)
            if name == "cnn":
                model = model.to(memory_format=torch.channels_last)
            t_train, t_evidence = our_epoch(model, x, y, device)
            ours.append(t_train)
            evidence.append(t_evidence)
        t_plain, t_tensors, t_ours, t_ev = (statistics.median(v) for v in (plain, tensors, ours, evidence))
        print(f"{name}: {len(x)} examples; plain loop on {source}\n"
              f"  (a) plain PyTorch loop          {t_plain:8.2f} s/epoch\n"
              f"  (a') plain loop, tensor Dataset {t_tensors:8.2f} s/epoch\n"
              f"  (b) bayes_prune trainer         {t_ours:8.2f} s/epoch   ratio (a)/(b) = "
              f"{t_plain / t_ours:.2f}x   (a')/(b) = {t_tensors / t_ours:.2f}x\n"
              f"  (c) evidence pass               {t_ev:8.2f} s (2 passes) = {t_ev / t_ours:.2f} of our "
              f"training epoch")


if __name__ == "__main__":
    main()
