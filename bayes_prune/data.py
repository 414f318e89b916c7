"""Datasets, read once into normalised tensors on the training device (methods.md A17).

Batches are index slices of these tensors (see `trainer.py`), so no DataLoader runs per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DatasetConfig, DatasetName

# Per-dataset channel means and stds (methods.md A17).
STATS: dict[DatasetName, tuple[tuple[float, ...], tuple[float, ...]]] = {
    DatasetName.mnist: ((0.1307,), (0.3081,)),
    DatasetName.fashion_mnist: ((0.2860,), (0.3530,)),
    DatasetName.cifar10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

TORCHVISION_CLASSES = {
    DatasetName.mnist: ("MNIST", "MNIST"),
    DatasetName.fashion_mnist: ("FashionMNIST", "FashionMNIST"),
    DatasetName.cifar10: ("CIFAR10", "cifar-10-batches-py"),
}


class DataError(RuntimeError):
    """A dataset could not be found or fetched; the message names the path and the fix."""


@dataclass
class Data:
    x_train: torch.Tensor  # float32 [n, C, H, W], normalised
    y_train: torch.Tensor  # int64 [n]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    x_val: torch.Tensor | None = None  # held out of the training set (dataset.val_fraction)
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device, channels_last: bool = False) -> Data:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        val = (None, None) if self.x_val is None else (self.x_val.to(device, memory_format=fmt),
                                                       self.y_val.to(device))
        return Data(self.x_train.to(device, memory_format=fmt), self.y_train.to(device),
                    self.x_test.to(device, memory_format=fmt), self.y_test.to(device),
                    self.num_classes, *val)


def _unreadable_mnist_files(raw: Path) -> list[str]:
    """The MNIST-format files in `raw` that torchvision cannot parse (truncated, damaged)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    bad = []
    for path in sorted(raw.glob("*-ubyte")):
        try:
            (read_image_file if "idx3" in path.name else read_label_file)(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse error means the file is damaged
            bad.append(f"{path} ({type(exc).__name__}: {str(exc)[:120]})")
    return bad


def _torchvision_split(name: DatasetName, root: Path, train: bool):
    import torchvision

    cls_name, folder = TORCHVISION_CLASSES[name]
    cls = getattr(torchvision.datasets, cls_name)
    where = root.resolve() / folder
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError as exc:
        missing = "not found" in str(exc).lower() and "corrupt" not in str(exc).lower()
        if not missing or (name is DatasetName.cifar10 and any(where.glob("*_batch*"))):
            bad = _unreadable_mnist_files(where / "raw") if name is not DatasetName.cifar10 else []
            files = "; ".join(bad) or f"files under {where} ({exc})"
            raise DataError(
                f"dataset '{name.value}' was found under {where} but cannot be read: {files}. Fix: "
                f"restore the damaged file (e.g. from the .gz beside it, or delete {where} so that "
                f"torchvision downloads it again)") from exc
    raw = (root / folder / "raw").resolve()
    created = [d for d in (raw, *raw.parents) if not d.exists()]
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as exc:  # no network, permission denied, ...
        for d in created:  # leave no empty folders behind in a wrong data root (deepest first)
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise DataError(
            f"dataset '{name.value}' was not found under {where} and could not be downloaded "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}). Fix: point the data "
            f"root at a folder holding {folder}/ (torchvision layout), e.g. "
            f"BAYES_PRUNE_DATA=/path/to/datasets or paths.data_dir=/path/to/datasets, or run once "
            f"where downloads work."
        ) from exc


def _images_to_tensor(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim == 3:  # [n, H, W] grayscale
        x = x.unsqueeze(1)
    elif x.shape[-1] == 3:  # [n, H, W, 3] (CIFAR's numpy layout)
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(255.0).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [n, C, H, W] images to size x size (torchvision's Resize on tensors)."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((len(x), x.shape[1], size, size), dtype=x.dtype)
    for i in range(0, len(x), 10_000):  # bounded memory for the 50,000-image sets
        out[i:i + 10_000] = F.interpolate(x[i:i + 10_000], size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out


def _split_val(data: Data, fraction: float) -> Data:
    """A fixed random `fraction` of the training set (its own generator) becomes the validation set."""
    n = len(data.x_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(20_240_602))
    n_val = round(fraction * n)
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Data(data.x_train[train], data.y_train[train], data.x_test, data.y_test, data.num_classes,
                data.x_train[val], data.y_train[val])


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def _load_torchvision(cfg: DatasetConfig, root: Path) -> Data:
    mean, std = STATS[cfg.name] if cfg.normalise is None else ([cfg.normalise[0]], [cfg.normalise[1]])
    splits = []
    for train in (True, False):
        ds = _torchvision_split(cfg.name, root, train)
        x = _images_to_tensor(ds.data)
        if cfg.resize is not None:  # resized on [0, 1] pixels, then normalised
            x = _resize(x, cfg.resize)
        x = _normalise(x, mean, std)
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        splits += [x, y]
    return Data(*splits, num_classes=10)


def _load_digits() -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images): the embedded dataset needing no download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=y.numpy())
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return Data((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test], 10)


def _make_synthetic(cfg: DatasetConfig) -> Data:
    """Class prototypes plus Gaussian noise; learnable, of any image shape, fixed by its own seed.

    Prototypes are smooth (a coarse random grid, upsampled) so that a CNN's local filters and
    pooling can learn them as well as an FCN can; white-noise prototypes are lost to max-pooling.
    """
    g = torch.Generator().manual_seed(12345)
    shape = tuple(cfg.shape)
    channels, height, width = shape
    coarse = torch.randn((cfg.num_classes, channels, min(4, height), min(4, width)), generator=g)
    prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.std()

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(cfg.num_classes, (n,), generator=g)
        x = prototypes[y] + cfg.noise * torch.randn((n, *shape), generator=g)
        return x, y

    x_train, y_train = sample(cfg.n_train)
    x_test, y_test = sample(cfg.n_test)
    return Data(x_train, y_train, x_test, y_test, cfg.num_classes)


def input_shape(cfg: DatasetConfig) -> tuple[tuple[int, int, int], int]:
    """(image shape, classes) of a dataset, known without loading it."""
    if cfg.name is DatasetName.synthetic:
        c, h, w = cfg.shape
        return ((c, h, w) if cfg.resize is None else (c, cfg.resize, cfg.resize)), cfg.num_classes
    shapes = {DatasetName.digits: (1, 8, 8), DatasetName.cifar10: (3, 32, 32)}
    c, h, w = shapes.get(cfg.name, (1, 28, 28))
    return ((c, h, w) if cfg.resize is None else (c, cfg.resize, cfg.resize)), 10


def load_data(cfg: DatasetConfig, data_dir: str | Path, device: torch.device,
              channels_last: bool = False) -> Data:
    """Load, normalise and move a dataset to `device`. Convolutions run much faster on CPU in
    channels-last layout (max-pooling 7x in bench measurements), hence the option."""
    if cfg.name is DatasetName.digits:
        data = _load_digits()
    elif cfg.name is DatasetName.synthetic:
        data = _make_synthetic(cfg)
    else:
        data = _load_torchvision(cfg, Path(data_dir))
    if cfg.resize is not None and cfg.name in (DatasetName.digits, DatasetName.synthetic):
        data.x_train, data.x_test = _resize(data.x_train, cfg.resize), _resize(data.x_test, cfg.resize)
    if cfg.val_fraction is not None:
        data = _split_val(data, cfg.val_fraction)
    if cfg.train_subset is not None:
        data.x_train, data.y_train = data.x_train[: cfg.train_subset], data.y_train[: cfg.train_subset]
    if cfg.test_subset is not None:
        data.x_test, data.y_test = data.x_test[: cfg.test_subset], data.y_test[: cfg.test_subset]
    return data.to(device, channels_last)
