"""The phases a run is made of, run in the order `pruner.phases` names them, `pruner.cycles` times.

    train     trainer.epochs epochs; after each, the method's `epoch_end` (during-training pruning)
    prune     the method's `prune` with a calibration set (post-training pruning)
    finetune  pruner.finetune_epochs epochs with the masks fixed
    compress  the method's `compress`: the model rebuilt smaller; when it removes nothing, the
              cycles stop

Every phase appends records to the run's history (`phase`, `cycle`, `epoch` in each) and is
followed by a checkpoint, so a run resumes at the phase and epoch where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from .config import FinetuneSelect, Phase
from .masks import global_sparsity, layer_sparsity
from .methods.base import Calibration
from .progress import ProgressReporter
from .run import RunState
from .trainer import Diverged

log = logging.getLogger("bayes_prune")
Checkpoint = Callable[[], None]


def calibration_set(run: RunState, size: int) -> Calibration:
    """A fixed random subset of the training set (its own generator: the same images on resume)."""
    n = len(run.data.x_train)
    g = torch.Generator().manual_seed(run.cfg.seed + 2_000_003)
    idx = torch.randperm(n, generator=g)[: min(size, n)].to(run.data.x_train.device)
    return Calibration(run.data.x_train[idx], run.data.y_train[idx])


def finite(evaluation: tuple[float, float], where: str) -> tuple[float, float]:
    """The (test loss, accuracy) pair, or Diverged if the loss is NaN or infinite."""
    if not math.isfinite(evaluation[0]):
        raise Diverged(f"the test loss became {evaluation[0]} after {where}")
    return evaluation


def _state_fields(run: RunState) -> dict:
    return {"sparsity": global_sparsity(run.prunable, run.dense.weights),
            "sparsity_per_layer": layer_sparsity(run.prunable, run.dense.weights)}


def epochs(run: RunState, phase: Phase, n_epochs: int, bars: bool, checkpoint: Checkpoint) -> bool:
    """`train` (with the method's end-of-epoch step) or `finetune` (masks fixed). Under
    `pruner.finetune_select=best_val` a finetune phase evaluates the validation set after every
    epoch and ends with the weights of its best epoch (the first, among equals)."""
    cycle = run.position.cycle
    select = phase is Phase.finetune and run.cfg.pruner.finetune_select is FinetuneSelect.best_val
    batches = -(-len(run.data.x_train) // run.cfg.trainer.batch_size)
    progress = ProgressReporter(bars, phase.value, n_epochs, run.position.epoch + 1, batches)
    for epoch in range(run.position.epoch + 1, n_epochs + 1):
        t0 = time.perf_counter()
        progress.start_epoch(epoch)
        train_loss, train_acc = run.train_epoch(epoch, phase, progress.batches_done)
        test_loss, test_acc = finite(run.evaluate(), f"{phase.value} epoch {epoch}")
        fields = run.method.epoch_end(run, epoch) if phase is Phase.train else {}
        after_loss, after_acc = run.evaluate() if fields.get("pruned") else (test_loss, test_acc)
        entry = {"phase": phase.value, "cycle": cycle, "epoch": epoch,
                 "train_loss": train_loss, "train_acc": train_acc,
                 "test_loss": after_loss, "test_acc": after_acc,
                 "test_loss_before_prune": test_loss, "test_acc_before_prune": test_acc,
                 **fields, **_state_fields(run)}
        if select:
            entry["val_loss"], entry["val_acc"] = run.evaluate_val()
            if run.best is None or entry["val_acc"] > run.best["val_acc"]:
                run.best = {"val_acc": entry["val_acc"], "epoch": epoch, "index": len(run.history),
                            "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}
        entry["seconds"] = time.perf_counter() - t0
        run.history.append(entry)
        run.position.epoch = epoch
        progress.end_epoch(entry)
        checkpoint()
    progress.close()
    if select and run.best is not None:
        run.model.load_state_dict(run.best["model"])
        run.history[run.best["index"]]["selected"] = True
        log.info("finetune: keeping epoch %d (best validation accuracy %.4f)", run.best["epoch"],
                 run.best["val_acc"])
        run.best = None
    return True


def prune(run: RunState) -> bool:
    t0 = time.perf_counter()
    calib = calibration_set(run, run.cfg.pruner.calibration_size)
    fields = run.method.prune(run, calib)
    test_loss, test_acc = finite(run.evaluate(), "the prune phase")
    entry = {"phase": Phase.prune.value, "cycle": run.position.cycle, "epoch": None,
             "test_loss": test_loss, "test_acc": test_acc, **fields, **_state_fields(run),
             "seconds": time.perf_counter() - t0}
    run.history.append(entry)
    log.info("prune: test_acc=%.4f sparsity=%.4f (%.1fs)", test_acc, entry["sparsity"],
             entry["seconds"])
    return True


def compress(run: RunState) -> bool:
    """Returns False when the method found nothing to remove (the cycles stop)."""
    t0 = time.perf_counter()
    fields = run.method.compress(run)
    # None, or fields with `changed: False`, when nothing was removed (the fields are still recorded)
    changed = fields is not None and bool(fields.pop("changed", True))
    test_loss, test_acc = run.evaluate()
    entry = {"phase": Phase.compress.value, "cycle": run.position.cycle, "epoch": None,
             "changed": changed, "test_loss": test_loss, "test_acc": test_acc, **(fields or {}),
             **_state_fields(run), "widths": run.widths, "params_total":
             sum(p.numel() for p in run.model.parameters()), "seconds": time.perf_counter() - t0}
    run.history.append(entry)
    log.info("compress (cycle %d): %s; widths %s, %d parameters", run.position.cycle,
             "units removed" if changed else "nothing to remove", run.widths, entry["params_total"])
    return changed


def run_phases(run: RunState, bars: bool, checkpoint: Checkpoint) -> None:
    """Run every phase from the run's position on, checkpointing after each; the run is over
    when `position.cycle` passes `pruner.cycles`."""
    pcfg = run.cfg.pruner
    runners = {Phase.train: lambda: epochs(run, Phase.train, run.cfg.trainer.epochs, bars, checkpoint),
               Phase.finetune: lambda: epochs(run, Phase.finetune, pcfg.finetune_epochs, bars,
                                              checkpoint),
               Phase.prune: lambda: prune(run), Phase.compress: lambda: compress(run)}
    pos = run.position
    while pos.cycle <= pcfg.cycles:
        phase = pcfg.phases[pos.phase]
        if len(pcfg.phases) > 1 or pcfg.cycles > 1:
            log.info("phase %s (cycle %d/%d)", phase.value, pos.cycle, pcfg.cycles)
        go_on = runners[phase]()
        pos.epoch, pos.phase = 0, pos.phase + 1
        if pos.phase == len(pcfg.phases):
            pos.cycle, pos.phase = pos.cycle + 1, 0
        if not go_on:
            pos.cycle, pos.phase = pcfg.cycles + 1, 0
        checkpoint()
