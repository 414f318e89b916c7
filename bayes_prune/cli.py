"""Command-line plumbing for `train.py`: argument fixes, and errors reported in one or two lines.

`train.py` runs Hydra with HYDRA_FULL_ERROR set, so every exception reaches `report` here instead
of Hydra's traceback printer: bad input (an unknown option or key, a value out of range, a missing
or damaged dataset, an unusable run directory) is one line and exit status 2; Ctrl-C is one line
and 130; a run whose loss became NaN or infinite exits 1 with one line naming the settings to change;
a run that fails for another reason exits 1 with its traceback (also in its metrics.json).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from .experiment import JobContext

NUMERIC_CHOICE = re.compile(r"^(sparsity)=(-?\d+(?:\.\d+)?(?:,-?\d+(?:\.\d+)?)*)$")
BAD_INPUT_EXIT = 2
INTERRUPTED_EXIT = 130
state = {"task_started": False}  # set by the task function: errors before it are Hydra's set-up


def job_context(cfg: DictConfig) -> JobContext:
    """What the Hydra job running now tells its run: its directory, overrides, whether it is one
    of a multirun and how many jobs run beside it, and its .hydra/ files (inside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .experiment import JobContext

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None) if multirun else None
    if n_jobs is not None and n_jobs < 0:  # joblib: -1 = all cores, -2 = all but one, ...
        n_jobs = (os.cpu_count() or 1) + 1 + n_jobs
    overrides = list(hc.overrides.task)
    return JobContext(
        run_dir=Path(hc.runtime.output_dir),
        overrides=overrides,
        multirun=multirun,
        parallel_jobs=max(1, n_jobs or 1),
        lock_dir=Path(hc.sweep.dir) / ".gpu_locks" if multirun else None,
        hydra_files={"config.yaml": OmegaConf.to_yaml(cfg),
                     "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
                     "overrides.yaml": OmegaConf.to_yaml(overrides)},
    )


def exit_bad_input(exc: BaseException) -> None:
    """From inside a single run: report bad input in one line and exit 2 (a SystemExit passes
    through Hydra's job runner without its extra "Error executing job" line)."""
    print(f"error: {_message(exc)}", file=sys.stderr)
    raise SystemExit(BAD_INPUT_EXIT) from exc


def exit_diverged(exc: BaseException) -> None:
    """From inside a single run whose loss became NaN or infinite: one line naming what to change,
    exit 1 (no traceback: nothing is wrong with the code)."""
    print(f"error: the run diverged: {exc}; its metrics.json says status diverged. Fix: a smaller "
          f"trainer.lr (or check the data); a re-run with the same settings resumes from the last "
          f"finished epoch and would diverge again", file=sys.stderr)
    raise SystemExit(1) from exc


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """`sparsity=25,50` -> `sparsity='25','50'`.

    Hydra parses a bare number as an int, and an int cannot select a config-group option
    ("Config group override must be a string"), yet the sparsity options are named by number.
    """
    out = []
    for arg in argv:
        m = NUMERIC_CHOICE.match(arg)
        out.append(f"{m[1]}=" + ",".join(f"'{v}'" for v in m[2].split(",")) if m else arg)
    return out


def _message(exc: BaseException) -> str:
    """The error's text in one or two lines (Hydra's option lists folded into one)."""
    text = str(exc).split("\nConfig search path")[0].strip()
    if "\nAvailable options" in text:
        head, _, options = text.partition("\nAvailable options")
        group, _, names = options.partition(":")
        group = group.strip().removeprefix("in").strip()
        text = f"{head.strip()}; the options of {group} are " + ", ".join(
            n for n in names.split() if n != "base")
    # Hydra's "use +key=value to append" advice is wrong here: added keys are refused too.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("To append to"))
    cause = str(exc.__cause__ or "").strip()
    if cause and cause[:60] not in text:  # the message may quote the cause already (shortened)
        text += " " + cause.splitlines()[0]
    return text


def _is_bad_input(exc: BaseException) -> bool:
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import ConfigError
    from .data import DataError

    return isinstance(exc, ConfigError | DataError | CompactHydraException | OmegaConfBaseException)


def run(main: Callable[[], object], argv: list[str]) -> int:
    """Run the Hydra app `main` on `argv`; returns the exit status."""
    sys.argv = quote_numeric_choices(argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except SystemExit as exc:  # --help, --cfg, argparse errors
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 - this is the process's error report
        if _is_bad_input(exc):
            print(f"error: {_message(exc)}", file=sys.stderr)
            return BAD_INPUT_EXIT
        if isinstance(exc, OSError) and not state["task_started"]:
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: cannot create the run directory{where}: {exc.strerror or exc}; choose a "
                  f"writable hydra.run.dir (or paths.output_dir)", file=sys.stderr)
            return BAD_INPUT_EXIT
        traceback.print_exc()
        print(f"error: the run failed: {type(exc).__name__}: {exc} (its metrics.json records the "
              f"traceback; re-run the command to resume)", file=sys.stderr)
        return 1
    return 0
