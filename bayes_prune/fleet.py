"""A fleet: many runs trained in one process as one stacked network (`stacked.py`).

Each member is an ordinary run: `run_experiment` in a thread of its own, with its own lock, skip,
resume, record, checkpoint and status, and a `MemberRun` as its state. The member's training
epochs, test passes and evidence passes are asks to the fleet, which the coordinator (the calling
thread) answers for all members at once from one `Stack`. Only one thread runs at a time: a member
runs until it asks (or ends) and then hands back, so global state (the torch RNG a run seeds and
builds its model with, the Hydra-free logging) is used as in a single run.

Members stack from the same starting point (position and optimizer steps, `start_signature`);
members resumed from another epoch form a later group. A member that fails or diverges leaves the
fleet with its own status, and the others go on in a stack rebuilt without it. Ctrl-C interrupts
every member (each records `interrupted` and resumes later).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError, Phase
from .cudagraph import use_cuda_graph
from .data import Data, DataError, input_shape, load_data
from .devices import threads_per_job
from .evidence import Evidence
from .experiment import JobContext, run_experiment
from .methods import Method, method_class
from .models import has_conv
from .record import save_torch
from .run import RunState
from .stacked import Stack, stacking_problem, start_signature
from .trainer import Diverged

log = logging.getLogger("bayes_prune")


def _meta_model(cfg: Config) -> torch.nn.Module:
    """The run's network on the meta device (no memory, no compute)."""
    shape, classes = input_shape(cfg.dataset)
    with torch.device("meta"):
        return method_class(cfg.pruner.method)(cfg.pruner, cfg).build_model(cfg.model, shape, classes)


def fleet_problem(cfg: Config) -> str | None:
    """Why a run of `cfg` cannot be a fleet member (None when it can), known before any data."""
    cls = method_class(cfg.pruner.method)
    if not (cls.stackable and cls.graph_safe() and cls.predict is Method.predict):
        return f"method {cls.key!r} cannot be stacked"
    if cfg.pruner.init_from is not None:
        return "pruner.init_from is set (it starts from another run's network)"
    if any(p not in (Phase.train, Phase.finetune) for p in cfg.pruner.phases):
        return (f"pruner.phases={[p.value for p in cfg.pruner.phases]} has a phase other than "
                f"train and finetune")
    return stacking_problem(_meta_model(cfg))


@dataclass
class Outcome:
    """How a member ended: its final test accuracy, or the exception that ended it."""

    value: float = math.nan
    error: BaseException | None = None


@dataclass
class _Member:
    cfg: Config
    job: JobContext
    inbox: queue.Queue = field(default_factory=queue.Queue)
    ask: tuple[str, object] | None = None  # what the member waits for
    run: MemberRun | None = None
    outcome: Outcome | None = None


class Seat:
    """What a run needs to be a fleet member (`JobContext.seat`): the fleet's device, its data
    and the fleet that answers its passes."""

    def __init__(self, fleet: Fleet, member: _Member) -> None:
        self.fleet, self.member, self.device = fleet, member, fleet.device

    def load_data(self, cfg, data_dir, device) -> Data:
        return self.fleet.data(cfg, data_dir)

    def run_state(self, cfg, method, data, device) -> MemberRun:
        self.member.run = MemberRun(self, cfg, method, data, device)
        return self.member.run

    def ask(self, kind: str, payload: object = None):
        return self.fleet.ask(self.member, kind, payload)

    def save(self, path, obj) -> None:
        self.fleet.save(path, obj)


class MemberRun(RunState):
    """A run whose training epochs, test passes and evidence passes its fleet computes."""

    def __init__(self, seat: Seat, *args) -> None:
        self.seat = seat
        super().__init__(*args)

    def train_epoch(self, epoch, phase, on_batches=None) -> tuple[float, float]:
        loss, acc = self.seat.ask("train")
        if not math.isfinite(loss):
            raise Diverged(f"the training loss became {loss} in {phase.value} epoch {epoch}")
        if on_batches is not None:
            on_batches(-(-len(self.data.x_train) // self.cfg.trainer.batch_size), loss, acc)
        return loss, acc

    def evaluate(self) -> tuple[float, float]:
        return self.seat.ask("evaluate")

    def evidence(self, subsample, seed, predict) -> MemberEvidence:
        return MemberEvidence(self.seat, super().evidence(subsample, seed, predict))


class MemberEvidence:
    """`Evidence.log_likelihood` of a member, answered by its fleet."""

    def __init__(self, seat: Seat, evidence: Evidence) -> None:
        self.seat, self.evidence = seat, evidence

    def log_likelihood(self, model) -> float:
        return self.seat.ask("log_likelihood", self.evidence)


class Fleet:
    """Runs that share dataset, model and trainer settings, trained as one stack on `device`."""

    def __init__(self, jobs: list[tuple[Config, JobContext]], device: torch.device,
                 name: str = "fleet") -> None:
        self.device, self.name = device, name
        self.members = [_Member(cfg, job) for cfg, job in jobs]
        for m in self.members:
            m.job.seat = Seat(self, m)
        self.inbox: queue.Queue[_Member] = queue.Queue()
        self.running: _Member | None = None  # the member thread that runs now, if not us
        self._data: Data | DataError | None = None
        self.stack: Stack | None = None
        self.writer = ThreadPoolExecutor(4, thread_name_prefix=f"{name}-checkpoints")
        self.writes: dict[Path, Future] = {}  # pending checkpoint writes by file
        first = jobs[0][0]
        self.graph = use_cuda_graph(first.trainer.cuda_graph, device, method_class(first.pruner.method))
        self.channels_last = has_conv(_meta_model(first))

    # -- called from member threads -----------------------------------------------------------------
    def data(self, cfg, data_dir) -> Data:
        """The training and test sets, loaded once for every member (channels-last for a CNN, as
        a single run holds them, so no member copies them)."""
        if self._data is None:
            try:
                self._data = load_data(cfg, data_dir, self.device, channels_last=self.channels_last)
            except DataError as exc:
                self._data = exc
        if isinstance(self._data, DataError):
            raise DataError(str(self._data))
        return self._data

    def save(self, path, obj) -> None:
        """Write a member's checkpoint in the background, overlapped with the next stacked epoch.

        Its tensors stay untouched until that epoch's results are scattered into the members,
        which waits for every pending write (`flush`); on a GPU they are copied to the host first.
        """
        if path in self.writes:  # one write at a time per file, in order
            self.writes.pop(path).result()
        if self.device.type != "cpu":
            obj = _to_cpu(obj)
        self.writes[path] = self.writer.submit(save_torch, path, obj)

    def flush(self) -> None:
        """Wait for the pending checkpoint writes (raises the first write's error)."""
        writes, self.writes = self.writes, {}
        for w in writes.values():
            w.result()

    def ask(self, member: _Member, kind: str, payload: object = None):
        member.ask = (kind, payload)
        self.inbox.put(member)
        reply = member.inbox.get()
        member.ask = None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _body(self, member: _Member) -> None:
        member.inbox.get()  # our first turn
        try:
            record = run_experiment(member.cfg, member.job)
            member.outcome = Outcome(value=float((record.get("final") or {}).get("test_acc", math.nan)))
        except (ConfigError, DataError) as exc:
            log.error("%s", exc)
            member.outcome = Outcome(error=exc)
        except BaseException as exc:  # noqa: BLE001 - recorded by run_experiment; reported by the launcher
            member.outcome = Outcome(error=exc)
        finally:
            member.ask = None
            self.inbox.put(member)

    # -- the coordinator ------------------------------------------------------------------------------
    def _turn(self, member: _Member, reply: object = None) -> None:
        """Let `member` run until it asks again or ends."""
        self.running = member
        member.inbox.put(reply)
        back = self.inbox.get()
        assert back is member
        self.running = None

    def run(self) -> list[Outcome]:
        threads = []
        try:
            for i, m in enumerate(self.members):
                threads.append(threading.Thread(target=self._body, args=(m,), daemon=True,
                                                name=f"{self.name}-member-{i}"))
                threads[-1].start()
                self._turn(m)  # builds its run state (seeded, as alone) and asks for its first pass
            torch.set_num_threads(threads_per_job(self.members[0].cfg.trainer.threads,
                                                  self.members[0].job.parallel_jobs))
            groups = Counter(start_signature(m.run) for m in self.members if m.ask is not None)
            for signature, _ in groups.most_common():
                group = [m for m in self.members if m.ask is not None and m.run is not None
                         and start_signature(m.run) == signature]
                self._train(group)
        except KeyboardInterrupt:
            if self.running is not None:  # let the member that runs reach its next ask
                self.inbox.get()
                self.running = None
            for m in self.members:
                if m.ask is not None:
                    self._turn(m, KeyboardInterrupt())
            raise
        finally:
            self.stack = None
            for w in self.writes.values():  # whatever happened, let the started writes finish
                w.exception()
            self.writer.shutdown()
        for t in threads:
            t.join()
        return [m.outcome or Outcome(error=RuntimeError("the member did not finish")) for m in self.members]

    def _train(self, group: list[_Member]) -> None:
        """Answer the asks of `group` until every member of it has ended."""
        log.info("%s: %d runs stacked on %s%s", self.name, len(group), self.device,
                 " (CUDA graphs)" if self.graph else "")
        while True:
            live = [m for m in group if m.ask is not None]
            if not live:
                return
            if self.stack is None or [r for r in self.stack.runs] != [m.run for m in live]:
                self.stack = Stack([m.run for m in live], self.graph)
            index = {id(m): i for i, m in enumerate(live)}
            kinds = {m.ask[0] for m in live}
            kind = next(k for k in ("evaluate", "log_likelihood", "train") if k in kinds)
            asking = [m for m in live if m.ask[0] == kind]
            if kind == "train" and len(asking) < len(live):
                raise RuntimeError(f"fleet members out of step: {sorted(kinds)}")
            t0 = time.perf_counter()
            try:
                members = [index[id(m)] for m in asking]
                if kind == "train":
                    replies = self.stack.train_epoch(before_scatter=self.flush)
                elif kind == "evaluate":
                    replies = self.stack.evaluate(members)
                else:
                    replies = self.stack.log_likelihood(members, [m.ask[1] for m in asking])
            except Exception as exc:  # noqa: BLE001 - every member asking records the failure
                log.error("%s: the stacked %s pass failed: %s: %s", self.name, kind,
                          type(exc).__name__, exc)
                replies = [_failure(kind, exc) for _ in asking]
                self.stack = None
            if kind == "train":
                seconds = time.perf_counter() - t0
                log.info("%s: training epoch of %d members in %.2f s (%.4f s per model-epoch)",
                         self.name, len(asking), seconds, seconds / len(asking))
            for m, reply in zip(asking, replies, strict=True):
                self._turn(m, reply)


def _to_cpu(obj):
    """`obj` with every tensor in it copied to the host."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _failure(kind: str, exc: Exception) -> RuntimeError:
    error = RuntimeError(f"the fleet's stacked {kind} pass failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
