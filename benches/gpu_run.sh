#!/usr/bin/env bash
# Every GPU check of the fused GTPO loss in one command on a lent GPU machine.
#
#   bash benches/gpu_run.sh prepare   # here: the wheels to carry, into .whl/ (ignored by git)
#   bash benches/gpu_run.sh device    # there: run(command="bash benches/gpu_run.sh device",
#                                     #            carry=[".whl"])
#
# `prepare` builds the turnrl wheel (the abi3 feature, so the GPU machine's Python 3.12
# takes it) and downloads liger-kernel, the one package the GPU image lacks
# for benches/gpu_loss.py. `device` installs both into /tmp/site, then runs,
# in order, with every log under $OUT: the Triton compile check, the Triton
# backend's tests on CUDA (compiled kernels against the float64 reference),
# and benches/gpu_loss.py at Qwen3-4B shapes. Each step's status is printed;
# a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    set -e
    rm -rf .whl && mkdir -p .whl
    python -m maturin build --release --features abi3 --out .whl
    python -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5"
    du -sh .whl && ls .whl
    ;;
device)
    out="${OUT:-/tmp/gpu-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$out/gpu.txt"
    step() {
        local name=$1
        shift
        echo "== $name: $*"
        "$@" 2>&1 | tee "$out/$name.log"
        echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/status.txt"
    }
    step compile python3 tests/kernels/aot_compile.py 90
    step kernel-tests python3 -m pytest -q -p no:cacheprovider tests/kernels
    step gpu-loss python3 benches/gpu_loss.py --csv "$out/gpu_loss.csv"
    ;;
*)
    echo "usage: bash benches/gpu_run.sh prepare|device" >&2
    exit 2
    ;;
esac
