# bayes_prune — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
N_JOBS ?= 2
# Hydra overrides passed through to sweeps, e.g. make table1 ARGS="dataset=mnist model=fcn seed=0,1"
ARGS   ?=
# joblib (N_JOBS parallel single runs) or fleet (stacked fleets, one per GPU at a time)
LAUNCHER ?= joblib
# Real datasets: BAYES_PRUNE_DATA, else ../shared/datasets when it exists, else data/ (downloads).
export BAYES_PRUNE_DATA ?= $(if $(wildcard ../shared/datasets/MNIST),$(abspath ../shared/datasets),data)

ifeq ($(LAUNCHER),fleet)
  LAUNCH := hydra/launcher=fleet
else
  LAUNCH := hydra/launcher=joblib hydra.launcher.n_jobs=$(N_JOBS)
endif
ifeq ($(QUICK),1)
  EXP := table1_quick
else
  EXP := table1
endif

.PHONY: help install demo test lint bench gpu-check table1 analysis clean-outputs lobs bench-lobs bmrs-table1 bmrs-analysis bench-bmrs evi evi-analysis bench-evi

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install bayes_prune with its dev tools

demo: install ## the card's sweep on the bundled digits data, then its table and figures
	$(PY) train.py -m name=demo dataset=digits pruner=bayes_magnitude sparsity=25,50,75,90,99 $(LAUNCH) $(ARGS)
	$(PY) -m bayes_prune.summary outputs/multirun/demo
	$(PY) -m analysis outputs/multirun/demo --out outputs/analysis/demo

test: install ## run the test suite (under 10 minutes on 2 CPU cores)
	$(PY) -m pytest -q

lint: install ## ruff
	$(VENV)/bin/ruff check .

bench: install ## time our trainer and evidence pass against a plain PyTorch loop
	$(PY) -m bayes_prune.bench

gpu-check: ## on a CUDA machine: bench, fleet and CUDA-graph tests, the suite; results in OUT=dir
	bash tests/gpu_check.sh

table1: install ## run the Table 1 grid (QUICK=1: table1_quick), resumable, then table, figures, report
	$(PY) train.py -m experiment=$(EXP)_unpruned $(LAUNCH) $(ARGS)
	$(PY) train.py -m experiment=$(EXP) $(LAUNCH) $(ARGS)
	$(PY) -m analysis outputs/multirun/$(EXP) --out outputs/analysis/$(EXP)

analysis: install ## rebuild table, figures and report from outputs/multirun/$(EXP) without running
	$(PY) -m analysis outputs/multirun/$(EXP) --out outputs/analysis/$(EXP)

clean-outputs: ## delete everything under outputs/ (runs, sweeps, analyses)
	find outputs -mindepth 1 ! -name .gitkeep -delete

lobs: install ## paper 001's figure: the dense LeNet-300-100, 5 post-training pruners x 12 targets, figure + CSV
	$(PY) train.py -m experiment=lobs_lenet300_dense $(LAUNCH) $(ARGS)
	$(PY) train.py -m experiment=lobs_lenet300 $(LAUNCH) $(ARGS)
	$(PY) -m analysis.lobs outputs/multirun/lobs_lenet300 --out outputs/analysis/lobs_lenet300

bench-lobs: install ## seconds per layer of each lobs variant pruning LeNet-300-100 to 90 % (CPU, and CUDA if present)
	$(PY) -m bayes_prune.bench_lobs

# Paper 002 (BMRS): Table 1 blocks and post-training (Fig. 2) runs, one sweep at a time, 1 thread.
BMRS_BLOCKS ?= mnist_mlp fashion_mnist_mlp mnist_lenet5 fashion_mnist_lenet5
BMRS_SEEDS  ?= 0,1,2
BMRS_POINTS ?= 21

bmrs-table1: install ## BMRS Table 1 + Fig. 2: each block's 7 pruners, then its post-training runs; analysis
	for b in $(BMRS_BLOCKS); do \
	  $(PY) train.py -m experiment=bmrs_$$b seed=$(BMRS_SEEDS) trainer.threads=1 $(ARGS) || exit 1; \
	  $(PY) train.py -m experiment=bmrs_$$b pruner=bmrs_post pruner.points=$(BMRS_POINTS) seed=$(BMRS_SEEDS) trainer.threads=1 $(ARGS) || exit 1; \
	done
	$(PY) -m analysis.bmrs outputs/multirun/bmrs --out outputs/analysis/bmrs

bmrs-analysis: install ## rebuild BMRS Table 1, structure table and Fig. 2 from outputs/multirun/bmrs
	$(PY) -m analysis.bmrs outputs/multirun/bmrs --out outputs/analysis/bmrs

bench-bmrs: install ## BMRS: epoch overhead of continuous pruning; cut vs dense latency of finished bmrs_n runs
	$(PY) -m bayes_prune.bench_bmrs overhead --kernels c scale torch --epochs 5 --set dataset.train_subset=12000 --out outputs/bench/bmrs_overhead.json
	$(PY) -m bayes_prune.bench_bmrs cut $$(ls -d outputs/multirun/bmrs/*/*/bmrs_n/sparsity=0/seed=0) --out outputs/bench/bmrs_cut.json

evi: install ## paper 003: MNIST / Fashion-MNIST loops and N sweeps (resumable), then analysis.evi
	$(PY) train.py -m experiment=evi_mnist $(ARGS)
	$(PY) train.py -m experiment=evi_sweep_mnist $(ARGS)
	$(PY) train.py -m experiment=evi_fmnist $(ARGS)
	$(PY) train.py -m experiment=evi_sweep_fmnist $(ARGS)
	$(PY) -m analysis.evi outputs/multirun/evi --out outputs/analysis/evi

evi-analysis: install ## paper 003: Fig. 5, Figs. 2-4 and the tables from outputs/multirun/evi
	$(PY) -m analysis.evi outputs/multirun/evi --out outputs/analysis/evi

bench-evi: install ## eVI seconds per epoch and peak memory, full vs diagonal (BENCH_ARGS="--device cuda")
	$(PY) -m bayes_prune.bench_evi $(BENCH_ARGS)
