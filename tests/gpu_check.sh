#!/usr/bin/env bash
# The CUDA checks of the fleet work in one go (make gpu-check), about 8 minutes on an H100/H200:
#   bench   single runs eager and graphed, fleets at K = 1, 21, 105, the fp32 compute limit (MNIST)
#   cuda    the CUDA and fleet tests: graphed runs and fleet members against their single runs
#   suite   the rest of the test suite, on CUDA
#   cifar   (not by default, ~1.5 min) the CNN bench on random CIFAR-10-shaped images, K = 105
#   papers  (not by default) the GPU figures of papers 001-003: bench_lobs (exact OBS to 90 %),
#           bench_evi (full vs diagonal at batch 16, 64, 256), bench_bmrs overhead (MLP, LeNet5)
# STAGES="bench cuda" picks stages. Results go to $OUT (default outputs/gpu-check/).
# Ready the checkout first where the GPU machine has no Hydra: bash ../shared/tools/device-prep.sh
set -uo pipefail
out=${OUT:-outputs/gpu-check}
stages=${STAGES:-bench cuda suite}
mkdir -p "$out"
[ -f .device/env.sh ] && source .device/env.sh
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
{ nvidia-smi; $py -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
status=0
run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || status=1; }
for stage in $stages; do
  case $stage in
    bench) run bench 210 $py -m bayes_prune.bench --device cuda --repeats 1 --fleet-modes graph ;;
    cuda) run cuda_tests 120 $py -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_fleet.py ;;
    suite) run suite 270 $py -m pytest -q -rs -p no:cacheprovider --durations=15 \
             --ignore=tests/test_cuda.py --ignore=tests/test_fleet.py ;;
    cifar) run bench_cifar 120 $py -m bayes_prune.bench --device cuda --repeats 1 --fleet-modes graph \
             --models cnn --shape 3 32 32 --n-train 50000 --fleet-sizes 105 ;;
    papers) run bench_lobs 240 $py -m bayes_prune.bench_lobs --device cuda
            run bench_evi 300 $py -m bayes_prune.bench_evi --device cuda --batch 16 64 256
            run bench_bmrs 240 $py -m bayes_prune.bench_bmrs overhead --device cuda \
              --blocks mnist_mlp mnist_lenet5 --epochs 3 --kernels torch ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
