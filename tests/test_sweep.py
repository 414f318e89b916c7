"""Multirun sweeps through the real CLI and launchers: parallel, resumable, browsable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import ROOT, strip_timings, train_cmd

from analysis.collect import collect
from analysis.table import table1
from bayes_prune.devices import _claim_gpu, threads_per_job

TINY = ["dataset=digits", "model.hidden=[64,64]", "trainer.epochs=2"]


def sweep(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd("-m", *TINY, f"paths.output_dir={out}", *args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def runs(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.rglob("metrics.json"))}


def test_joblib_sweep_runs_jobs_in_parallel_into_readable_dirs_and_analysis_tabulates_it(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "name=grid",
                 "pruner=random,bayes_magnitude", "sparsity=50,90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = runs(tmp_path)
    extra = "model.hidden=[64,64],trainer.epochs=2"  # non-default overrides name a level of their own
    assert sorted(found) == [f"multirun/grid/digits/fcn/{p}/sparsity={s}/{extra}/seed=0"
                             for p in ("bayes_magnitude", "random") for s in (50, 90)]
    assert all(r["status"] == "done" and r["threads"] == threads_per_job(0, 2) for r in found.values())
    # two worker processes were busy at once: their epoch intervals overlap in time
    pids = {line.split("pid=")[1].split()[0] for line in proc.stdout.splitlines() if "pid=" in line}
    assert len(pids) == 2, proc.stdout[-2000:]
    col = collect(tmp_path)
    table = table1(col.runs, paper=None)
    assert table.loc[("digits", "fcn", "", 90), ("Random", "n")] == 1
    assert table.loc[("digits", "fcn", "", 50), ("Bayes Magnitude", "realised_sparsity")] == 50.0


def test_sweep_trains_unpruned_once_per_seed_and_tabulates_each_lr_as_its_own_row(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "name=cells",
                 "pruner=none,magnitude", "sparsity=50,90", "seed=0,1", "trainer.lr=0.001,0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = runs(tmp_path)
    unpruned = sorted(k for k in found if "/none/" in k)
    assert len(found) == 4 + 8 and len(unpruned) == 4  # 2 seeds x 2 lr, not x 2 sparsities
    assert all("/sparsity=0/" in k for k in unpruned)
    table = table1(collect(tmp_path).runs, paper=None)
    rows = {(v, s) for _, _, v, s in table.index}
    # as many runs at each lr: neither is "the" setting, so both rows are labelled
    assert rows == {("lr=0.001", 50), ("lr=0.001", 90), ("lr=0.01", 50), ("lr=0.01", 90)}
    for v in ("lr=0.001", "lr=0.01"):
        assert table.loc[("digits", "fcn", v, 50), ("Unpruned", "n")] == 2
        assert table.loc[("digits", "fcn", v, 90), ("Magnitude", "n")] == 2
    lrs = {v: table.loc[("digits", "fcn", v, 90), ("Magnitude", "mean")] for v in ("lr=0.001", "lr=0.01")}
    assert lrs["lr=0.001"] != lrs["lr=0.01"]


def test_sweep_killed_midway_resumes_without_redoing_finished_runs(tmp_path):
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "name=kill", "pruner=magnitude",
            "sparsity=25,50,75,90", "trainer.epochs=6"]
    reference = tmp_path / "reference"
    assert sweep(reference, *args).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd("-m", *TINY, f"paths.output_dir={killed}", *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        states = [r.get("status") for r in runs(killed).values()]
        if "done" in states and len(states) < 4 or states.count("done") >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = runs(killed)
    finished = {k for k, r in before.items() if r["status"] == "done"}
    assert finished and len(finished) < 4, {k: r["status"] for k, r in before.items()}

    again = sweep(killed, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    after = runs(killed)
    assert len(after) == 4 and all(r["status"] == "done" for r in after.values())
    for k in finished:  # not redone: the file is the one written before the kill
        assert after[k]["updated_at"] == before[k]["updated_at"]
    ref = runs(reference)
    for key in ("history", "final"):
        assert ({k: strip_timings(v[key]) for k, v in after.items()}
                == {k: strip_timings(v[key]) for k, v in ref.items()})


def test_failing_job_does_not_stop_the_others_and_records_its_traceback(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "name=fail",
                 "dataset=digits,mnist", f"paths.data_dir={tmp_path}/no-data")
    assert proc.returncode != 0
    by_status = {r["config"]["dataset"]["name"]: r for r in runs(tmp_path).values()}
    assert by_status["digits"]["status"] == "done"
    assert by_status["mnist"]["status"] == "failed"
    assert "Traceback" in by_status["mnist"]["error"]["traceback"]


def test_submitit_local_launcher_runs_a_tiny_sweep(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "name=sub",
                 "seed=0,1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = runs(tmp_path)
    assert len(found) == 2 and all(r["status"] == "done" for r in found.values())
    assert list((tmp_path / "multirun" / "sub" / ".submitit").glob("*/*_log.out"))


def test_slurm_preset_composes_with_one_gpu_per_task():
    proc = subprocess.run(train_cmd("hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "gpus_per_node: 1" in proc.stdout


def test_parallel_jobs_claim_gpu_slots_round_robin_and_release_them(tmp_path):
    claims = [_claim_gpu(tmp_path, n_gpus=2) for _ in range(3)]
    assert [gpu for gpu, _ in claims] == [0, 1, 0]  # the third job shares GPU 0 in a second slot
    claims[0][1].close()  # job 1 ends: its lock is released
    again = _claim_gpu(tmp_path, n_gpus=2)
    assert again[0] == 0
    for _, handle in claims[1:] + [again]:
        handle.close()


def test_cpu_threads_are_shared_among_parallel_jobs():
    import os

    cores = len(os.sched_getaffinity(0))
    assert threads_per_job(0, 1) == cores
    assert threads_per_job(0, cores) == 1
    assert threads_per_job(0, 4 * cores) == 1
    assert threads_per_job(3, 2) == 3
