"""Progress display: tqdm bars on a terminal, plain log lines under a launcher or in a pipe."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from .config import Progress

log = logging.getLogger("bayes_prune")


def use_bars(setting: Progress, multirun: bool) -> bool:
    if setting is Progress.auto:
        return sys.stderr.isatty() and not multirun
    return setting is Progress.on


class ProgressReporter:
    """Bars and log lines for the epochs of one phase (`train`, `finetune`)."""

    def __init__(self, bars: bool, phase: str, epochs: int, start_epoch: int,
                 batches_per_epoch: int) -> None:
        self.bars = bars
        self.phase = phase
        self.epochs = epochs
        self.batches = batches_per_epoch
        self.epoch_bar = (tqdm(total=epochs, initial=start_epoch - 1, desc=phase, position=0,
                               dynamic_ncols=True) if bars else None)
        self.batch_bar: tqdm | None = None

    def start_epoch(self, epoch: int) -> None:
        if self.bars:
            self.batch_bar = tqdm(total=self.batches, desc=f"{self.phase} epoch {epoch}", position=1,
                                  leave=False, dynamic_ncols=True)

    def batches_done(self, done: int, loss: float, acc: float) -> None:
        if self.batch_bar is not None:
            self.batch_bar.update(done - self.batch_bar.n)
            self.batch_bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", refresh=False)

    def end_epoch(self, record: dict) -> None:
        line = (f"{self.phase} epoch {record['epoch']}/{self.epochs} "
                f"train_loss={record['train_loss']:.4f} train_acc={record['train_acc']:.4f} "
                f"test_acc={record['test_acc']:.4f} sparsity={record['sparsity']:.4f}")
        if "log_bf" in record:
            line += f" log_bf={record['log_bf']:.3g} gate={'open' if record['gate_open'] else 'closed'}"
        line += f" ({record['seconds']:.1f}s)"
        if self.batch_bar is not None:
            self.batch_bar.close()
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)
            self.epoch_bar.set_postfix(test_acc=f"{record['test_acc']:.4f}",
                                       sparsity=f"{record['sparsity']:.3f}")
        log.info(line)  # through tqdm.write while bars are shown (experiment.py redirects logging)

    def close(self) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.close()
