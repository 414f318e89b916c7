#!/usr/bin/env bash
# The CUDA checks of the fleet work in one go, about 8 minutes on an H100/H200 (make gpu-check):
# the bench (single runs eager and graphed, fleets at K = 1, 21, 105, the fp32 compute limit), the
# CUDA and fleet tests (equivalence of fleet members and graphed runs with their single runs), then
# the rest of the suite on CUDA. Results go to $OUT (default outputs/gpu-check/).
# Ready the checkout first where the GPU machine has no Hydra: bash ../shared/tools/device-prep.sh
set -uo pipefail
out=${OUT:-outputs/gpu-check}
mkdir -p "$out"
[ -f .device/env.sh ] && source .device/env.sh
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
{ nvidia-smi; $py -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
status=0
timeout 210 $py -m bayes_prune.bench --device cuda --repeats 1 --fleet-modes graph 2>&1 | tee "$out/bench.txt" || status=1
timeout 120 $py -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_fleet.py 2>&1 \
  | tee "$out/cuda_tests.txt" || status=1
timeout 270 $py -m pytest -q -rs -p no:cacheprovider --durations=15 --ignore=tests/test_cuda.py \
  --ignore=tests/test_fleet.py 2>&1 | tee "$out/suite.txt" || status=1
exit $status
