"""One experiment of paper 000 end to end: train, prune behind the Bayes-factor gate, record.

`run_experiment` is what `train.py` calls. It resumes from the run directory's checkpoint, skips
a run whose `metrics.json` already says done, and leaves `status: failed` with the traceback when
anything raises.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import SCHEMA_VERSION, Config, ConfigError, MaskMode, ModelName, Objective
from .data import load_data
from .devices import job_device, threads_per_job
from .evidence import Evidence, add_prior_grad_, evaluate, log_prior
from .masks import (
    GradMasker,
    apply_masks,
    changes_weights,
    full_masks,
    global_sparsity,
    layer_sparsity,
    restore_weights,
    zero_optimizer_state,
)
from .metrics import size_metrics
from .models import build_model, eval_batch_size, prunable_layers, weight_layers
from .progress import ProgressReporter, use_bars
from .pruners import Pruner, build_pruner, gate_open, layer_target, scheduled_rate
from .record import (
    CHECKPOINT,
    MASKS,
    METRICS,
    WEIGHTS,
    read_metrics,
    save_torch,
    versions,
    write_json,
)
from .trainer import make_optimizer, train_epoch

log = logging.getLogger("bayes_prune")

# Settings that do not change a run's results: a run directory may be resumed under other values.
NON_RESULT_KEYS = {("paths",), ("resume",), ("name",), ("trainer", "device"),
                   ("trainer", "progress"), ("trainer", "threads"),
                   ("trainer", "eval_batch_size")}


@dataclass
class JobContext:
    """What the launcher tells a job: where it writes, and how many jobs run beside it."""

    run_dir: Path
    overrides: list[str]
    multirun: bool = False
    parallel_jobs: int = 1
    lock_dir: Path | None = None


def result_config(config: dict) -> dict:
    """The config without the keys in NON_RESULT_KEYS: what must match to resume a run."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in NON_RESULT_KEYS:
        if len(key) == 1:
            out.pop(key[0], None)
        else:
            out.get(key[0], {}).pop(key[1], None)
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_same_config(stored: dict, current: dict, where: Path) -> None:
    a, b = result_config(stored), result_config(current)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(
            f"run directory {where} holds a run with a different config (differs in: "
            f"{', '.join(diff)}); pick another hydra.run.dir, or pass resume=false to overwrite it")


def run_experiment(cfg: Config, config: dict, job: JobContext) -> dict:
    """Run (or resume, or skip) one experiment; returns the final metrics.json content."""
    run_dir = job.run_dir
    existing = read_metrics(run_dir)
    if cfg.resume and existing is not None:
        _check_same_config(existing["config"], config, run_dir)
        if existing["status"] == "done":
            log.info("already done, skipping: %s", run_dir)
            return existing

    record = {
        "schema_version": SCHEMA_VERSION, "status": "running", "error": None,
        "run_dir": str(run_dir), "config": config, "overrides": job.overrides, "seed": cfg.seed,
        "device": None, "threads": None, "versions": versions(), "started_at": _now(),
        "updated_at": _now(), "history": [], "final": None,
    }
    try:
        with job_device(cfg.trainer.device, job.lock_dir) as device:
            threads = threads_per_job(cfg.trainer.threads, job.parallel_jobs)
            torch.set_num_threads(threads)
            record.update(device=str(device), threads=threads)
            bars = use_bars(cfg.trainer.progress, job.multirun)
            with logging_redirect_tqdm() if bars else nullcontext():
                _train(cfg, record, job, device, bars)
    except ConfigError:  # the directory belongs to another run: leave its files alone
        raise
    except BaseException as exc:
        record.update(status="failed", updated_at=_now(), error={
            "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()})
        write_json(run_dir / METRICS, record)
        log.error("run failed: %s: %s", type(exc).__name__, exc)
        raise
    return record


def _train(cfg: Config, record: dict, job: JobContext, device: torch.device, bars: bool) -> None:
    run_dir = job.run_dir
    seed_everything(cfg.seed)
    channels_last = cfg.model.name is ModelName.cnn
    data = load_data(cfg.dataset, cfg.paths.data_dir, device, channels_last)
    n_train = len(data.x_train)
    pruner = build_pruner(cfg.pruner)
    model = pruner.prepare_model(build_model(cfg.model, data.input_shape, data.num_classes))
    model = model.to(device, memory_format=torch.channels_last if channels_last
                     else torch.preserve_format)
    optimizer = make_optimizer(model, cfg.trainer.lr, device)
    layers = prunable_layers(model, cfg.pruner.prune_output)
    prior_weights = [m.weight for m in weight_layers(model).values()]
    masks = full_masks(layers)
    ebs = eval_batch_size(model, device, cfg.trainer.eval_batch_size)
    evidence = Evidence(data.x_train, data.y_train, ebs, cfg.evidence.subsample, cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    prune_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    target = cfg.sparsity.percent / 100.0
    prev_log_bf = math.inf
    wall_before = 0.0
    start_epoch = 1

    ckpt_path = run_dir / CHECKPOINT
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        _check_same_config(ckpt["config"], record["config"], run_dir)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        masks = {n: m.to(device) for n, m in ckpt["masks"].items()}
        shuffle_gen.set_state(ckpt["shuffle_gen"])
        prune_gen.set_state(ckpt["prune_gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        prev_log_bf, wall_before = ckpt["prev_log_bf"], ckpt["wall_seconds"]
        record["history"], record["started_at"] = ckpt["history"], ckpt["started_at"]
        start_epoch = ckpt["epoch"] + 1
        log.info("resuming %s from epoch %d", run_dir, start_epoch)

    persistent = cfg.pruner.mask is MaskMode.persistent
    grad_masker = GradMasker(layers, masks) if persistent else None
    posterior = cfg.trainer.objective is Objective.posterior

    def before_step() -> None:
        if grad_masker is not None:
            grad_masker()
        if posterior:
            add_prior_grad_(prior_weights, cfg.prior, n_train)

    overrides_penalty = type(pruner).penalty is not Pruner.penalty
    extra_loss = (lambda: pruner.penalty(model)) if overrides_penalty else None
    batches = (n_train + cfg.trainer.batch_size - 1) // cfg.trainer.batch_size
    progress = ProgressReporter(bars, cfg.trainer.epochs, start_epoch, batches)
    log.info("run dir: %s | device %s | pid=%d | %d train / %d test examples | %d parameters",
             run_dir, device, os.getpid(), n_train, len(data.x_test),
             sum(p.numel() for p in model.parameters()))
    t_start = time.perf_counter()

    for epoch in range(start_epoch, cfg.trainer.epochs + 1):
        t0 = time.perf_counter()
        progress.start_epoch(epoch)
        train_loss, train_acc = train_epoch(
            model, optimizer, data.x_train, data.y_train, cfg.trainer.batch_size, shuffle_gen,
            before_step=before_step, extra_loss=extra_loss, on_batches=progress.batches_done)
        test_ce, test_correct = evaluate(model, data.x_test, data.y_test, ebs)

        # Evidence pass and the gate (methods.md §1.2 a-e).
        t_ev = time.perf_counter()
        rate = scheduled_rate(cfg.pruner, target, epoch)
        candidate = pruner.propose(layers, masks, rate, prune_gen)
        ll_before = evidence.log_likelihood(model)
        lp_before = ll_before + log_prior(prior_weights, cfg.prior)
        changes = changes_weights(layers, candidate)
        saved = apply_masks(layers, candidate) if changes else {}
        ll_after = evidence.log_likelihood(model) if changes else ll_before
        lprior_after = log_prior(prior_weights, cfg.prior)
        log_bf = (ll_after + lprior_after) - lp_before
        is_open = gate_open(cfg.pruner.gate, log_bf, prev_log_bf, cfg.pruner.beta)
        if is_open:
            masks = candidate
            if persistent:
                zero_optimizer_state(optimizer, layers, masks)
                grad_masker = GradMasker(layers, masks)
        else:
            restore_weights(layers, saved)
            ll_after, lprior_after = ll_before, lp_before - ll_before
        prev_log_bf = log_bf
        evidence_seconds = time.perf_counter() - t_ev

        if is_open and changes:
            after_ce, after_correct = evaluate(model, data.x_test, data.y_test, ebs)
        else:
            after_ce, after_correct = test_ce, test_correct
        n_test = len(data.y_test)
        entry = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": after_ce / n_test, "test_acc": after_correct / n_test,
            "test_loss_before_prune": test_ce / n_test,
            "test_acc_before_prune": test_correct / n_test,
            "log_prior": lprior_after, "log_likelihood": ll_after, "log_bf": log_bf,
            "gate_open": is_open, "pruned": is_open and changes, "target_sparsity": rate,
            "sparsity": global_sparsity(layers),
            "sparsity_per_layer": layer_sparsity(layers),
            "epoch_seconds": time.perf_counter() - t0, "evidence_seconds": evidence_seconds,
        }
        record["history"].append(entry)
        record["updated_at"] = _now()
        progress.end_epoch(entry)
        save_torch(ckpt_path, {
            "config": record["config"], "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "masks": masks,
            "shuffle_gen": shuffle_gen.get_state(), "prune_gen": prune_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "prev_log_bf": prev_log_bf,
            "wall_seconds": wall_before + time.perf_counter() - t_start,
            "history": record["history"], "started_at": record["started_at"]})
        write_json(run_dir / METRICS, record)
    progress.close()

    pruner.after_training(model, data.x_train)
    test_ce, test_correct = evaluate(model, data.x_test, data.y_test, ebs)
    sizes = size_metrics(model, layers, data.input_shape)
    record["final"] = {
        "test_acc": test_correct / len(data.y_test), "test_loss": test_ce / len(data.y_test),
        **sizes, "target_sparsity": target,
        "epoch_target_reached": _epoch_target_reached(record["history"], layers, target),
        "wall_seconds": wall_before + time.perf_counter() - t_start,
        "epochs": cfg.trainer.epochs,
    }
    save_torch(run_dir / WEIGHTS, model.state_dict())
    save_torch(run_dir / MASKS, {n: m.cpu() for n, m in masks.items()})
    record.update(status="done", updated_at=_now())
    write_json(run_dir / METRICS, record)
    f = record["final"]
    log.info("done: test_acc=%.4f sparsity=%.4f compression=%.2fx wall=%.1fs -> %s",
             f["test_acc"], f["sparsity"], f["compression"], f["wall_seconds"], run_dir)


def _epoch_target_reached(history: list[dict], layers: dict, target: float) -> int | None:
    """First epoch at which every prunable layer held at least floor(target * n) zeros."""
    need = {n: layer_target(m.weight.numel(), target) / m.weight.numel() for n, m in layers.items()}
    for entry in history:
        if all(entry["sparsity_per_layer"][n] >= need[n] - 1e-12 for n in need):
            return entry["epoch"]
    return None
