"""`hydra/launcher=fleet`: a multirun's jobs trained as stacked fleets, one per device at a time.

    python train.py -m experiment=table1 hydra/launcher=fleet [hydra.launcher.devices=[cuda:0,cuda:1]]

Jobs whose configs agree on everything but the pruner, the sparsity and the seed (dataset, model,
trainer, prior, evidence settings) form a fleet (`fleet.py`): one process trains them as one stacked
network, each member still an ordinary run with its own directory, record, checkpoint and status.
Fleets are spread over `devices` (every visible GPU by default, else the CPU), one worker process
per device when there are several. A job that cannot be stacked (another method family, a config
error, a run directory shared with an earlier job) runs afterwards as a single run in this process,
with a log line saying why. `max_members` splits larger fleets (GPU memory).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from . import cli
from .config import Config, ConfigError, to_dict, validate
from .devices import check_device
from .experiment import JobContext, check_buildable
from .fleet import Fleet, Outcome, fleet_problem
from .methods import method_class

log = logging.getLogger("bayes_prune.launcher")
VARYING = ("pruner", "sparsity", "seed")  # what members of one fleet may differ in


@dataclass
class _Job:
    num: int
    sweep_config: DictConfig
    ret: JobReturn  # what Hydra resolved for the job (config, directory, overrides)
    cfg: Config | None = None
    context: JobContext | None = None
    single: str | None = None  # why it runs as a single run


def fleet_key(cfg: Config) -> str:
    """Jobs with equal keys train in one fleet."""
    return json.dumps({k: v for k, v in to_dict(cfg).items() if k not in VARYING}, sort_keys=True)


def auto_devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def _picklable(outcome: Outcome) -> Outcome:
    try:
        pickle.dumps(outcome)
        return outcome
    except Exception:  # noqa: BLE001 - an exception that does not pickle crosses as its text
        err = outcome.error
        return Outcome(outcome.value, RuntimeError(f"{type(err).__name__}: {err}"))


def run_fleets(fleets: list[list[tuple[int, Config, JobContext]]], device: str,
               logging_cfg: DictConfig | None = None) -> dict[int, Outcome]:
    """Train `fleets` one after another on `device`; the outcome of every job by number."""
    if logging_cfg is not None:  # a worker process
        configure_log(logging_cfg)
    outcomes: dict[int, Outcome] = {}
    for i, fleet in enumerate(fleets):
        name = f"fleet {i + 1}/{len(fleets)} on {device}"
        try:
            done = Fleet([(cfg, ctx) for _, cfg, ctx in fleet], torch.device(device), name).run()
        except ConfigError as exc:  # e.g. trainer.cuda_graph=on for a fleet placed on the CPU
            log.error("%s cannot start: %s", name, exc)
            done = [Outcome(error=exc)] * len(fleet)
        outcomes.update({num: _picklable(o) for (num, _, _), o in zip(fleet, done, strict=True)})
    return outcomes


def prepare_job(hydra_context: HydraContext, config: DictConfig, singleton_state: dict | None,
                num: int, overrides: Sequence[str]) -> _Job:
    """Job `num` resolved as Hydra would run it (its config, directory, overrides, .hydra files),
    validated, and whether it can join a fleet."""
    if singleton_state is not None:  # a worker process
        Singleton.set_state(singleton_state)
        setup_globals()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
    job = _Job(num, sweep_config, JobReturn())

    def prepare(task_cfg: DictConfig) -> None:
        job.context = cli.job_context(task_cfg)
        try:
            cfg = validate(task_cfg)
            check_buildable(cfg, method_class(cfg.pruner.method)(cfg.pruner, cfg))
        except ConfigError as exc:
            job.single = f"its config is refused ({str(exc).splitlines()[0]})"
            return
        job.cfg, job.single = cfg, fleet_problem(cfg)

    job.ret = run_job(hydra_context=hydra_context, task_function=prepare, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                      configure_logging=False)
    if job.ret.status is not JobStatus.COMPLETED:
        job.single = f"it could not be prepared ({job.ret._return_value})"
    return job


class FleetLauncher(Launcher):
    def __init__(self, devices: str | Sequence[str] = "auto", max_members: int | None = None,
                 prepare_workers: int | None = None) -> None:
        self.devices = auto_devices() if devices == "auto" else [str(d) for d in devices]
        for d in self.devices:
            check_device(d)
        if max_members is not None and max_members < 1:
            raise ConfigError(f"invalid value hydra.launcher.max_members={max_members}: expected "
                              f"null or an integer >= 1")
        self.max_members, self.prepare_workers = max_members, prepare_workers
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    # -- preparing the jobs ---------------------------------------------------------------------
    def _prepare_all(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[_Job]:
        """Resolve every job as Hydra would run it, without running it: one Hydra composition
        each, in worker processes when there are many jobs (the compositions dominate)."""
        assert self.config is not None and self.hydra_context is not None
        nums = range(first, first + len(job_overrides))
        workers = self.prepare_workers
        if workers is None:
            workers = min(16, os.cpu_count() or 1) if len(job_overrides) >= 64 else 1
        if workers <= 1:
            return [prepare_job(self.hydra_context, self.config, None, n, o)
                    for n, o in zip(nums, job_overrides, strict=True)]
        from joblib import Parallel, delayed  # loky pickles Hydra's state as the joblib launcher does

        state = Singleton.get_state()
        return Parallel(n_jobs=workers, backend="loky", batch_size=8)(
            delayed(prepare_job)(self.hydra_context, self.config, state, n, o)
            for n, o in zip(nums, job_overrides, strict=True))

    def _plan(self, jobs: list[_Job]) -> tuple[list[tuple[str, list[list[_Job]]]], list[_Job]]:
        """Fleets per worker (a device, listed once per worker), and the jobs that run as single
        runs afterwards."""
        groups: dict[str, list[_Job]] = defaultdict(list)
        owner: dict[Path, int] = {}
        for job in jobs:
            if job.single is None and job.context is not None:
                first = owner.setdefault(job.context.run_dir, job.num)
                if first != job.num:
                    job.single = f"its run directory is job #{first}'s (it will find that run done)"
            if job.single is None:
                groups[fleet_key(job.cfg)].append(job)
        chunk = self.max_members or max([len(g) for g in groups.values()] or [1])
        fleets = [g[i:i + chunk] for g in groups.values() for i in range(0, len(g), chunk)]
        workers: list[tuple[str, list[list[_Job]]]] = [(d, []) for d in self.devices]
        for fleet in sorted(fleets, key=len, reverse=True):  # largest first, to the least loaded
            pinned = fleet[0].cfg.trainer.device
            if pinned != "auto" and pinned not in self.devices:
                workers.append((pinned, []))
            slots = [w for w in workers if pinned in ("auto", w[0])]
            min(slots, key=lambda w: sum(len(f) for f in w[1]))[1].append(fleet)
        return [w for w in workers if w[1]], [j for j in jobs if j.single is not None]

    # -- running them ---------------------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = self._prepare_all(job_overrides, initial_job_idx)
        for job, overrides in zip(jobs, job_overrides, strict=True):
            log.info("\t#%d : %s", job.num, " ".join(filter_overrides(overrides)))
        plan, singles = self._plan(jobs)
        configure_log(self.config.hydra.job_logging, self.config.hydra.verbose)
        log.info("%d jobs: %d in %d fleet(s) on %s, %d as single runs", len(jobs),
                 len(jobs) - len(singles), sum(len(f) for _, f in plan),
                 ", ".join(d for d, _ in plan) or "no device", len(singles))
        specs = [(device, [[(j.num, j.cfg, self._member_context(j, len(plan))) for j in fleet]
                           for fleet in fleets]) for device, fleets in plan]
        outcomes: dict[int, Outcome] = {}
        if len(specs) == 1:
            outcomes = run_fleets(specs[0][1], specs[0][0])
        elif len(specs) > 1:  # one worker process per device
            with ProcessPoolExecutor(len(specs), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_fleets, fleets, device, self.config.hydra.job_logging)
                           for device, fleets in specs]
                for future in futures:
                    outcomes.update(future.result())
        for job in jobs:
            if job.num in outcomes:
                _finish(job.ret, outcomes[job.num])
        for job in singles:
            log.info("job #%d runs as a single run: %s", job.num, job.single)
            job.ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                              config=job.sweep_config, job_dir_key="hydra.sweep.dir",
                              job_subdir_key="hydra.sweep.subdir")
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [job.ret for job in jobs]

    @staticmethod
    def _member_context(job: _Job, workers: int) -> JobContext:
        assert job.context is not None
        job.context.parallel_jobs = max(1, workers)  # processes sharing this machine's cores
        job.context.lock_dir = None  # the fleet's device is given, no GPU slot to claim
        return job.context


def _finish(ret: JobReturn, outcome: Outcome) -> None:
    if outcome.error is None:
        ret.return_value, ret.status = outcome.value, JobStatus.COMPLETED
    else:
        ret.return_value, ret.status = outcome.error, JobStatus.FAILED


def register_launcher() -> None:
    """Make `hydra/launcher=fleet` instantiable.

    Hydra 1.3 instantiates a launcher only if its `_target_` lies in the `hydra_plugins` namespace
    package (hydra#1554, #3015; Hydra 1.4 adds entry-point discovery, #3449). This project ships no
    top-level package of that name, so the class is registered with Hydra's plugin registry by name
    and admitted, by exactly that name, to the namespace check.
    """
    plugins = Plugins.instance()
    plugins.register(FleetLauncher)
    ours = f"{FleetLauncher.__module__}.{FleetLauncher.__qualname__}"
    hydra_check = Plugins.is_in_toplevel_plugins_module
    if getattr(hydra_check, "admits", None) == ours:
        return

    def is_in_toplevel_plugins_module(clazz: str) -> bool:
        return clazz == ours or hydra_check(clazz)

    is_in_toplevel_plugins_module.admits = ours  # type: ignore[attr-defined]
    Plugins.is_in_toplevel_plugins_module = staticmethod(is_in_toplevel_plugins_module)  # type: ignore[method-assign]

