#!/usr/bin/env bash
# Every GPU check of the fused GTPO loss in one command on a lent GPU machine.
#
#   bash benches/gpu_run.sh prepare   # here: the wheels to carry, into .whl/ (ignored by git)
#   bash benches/gpu_run.sh device    # there: run(command="bash benches/gpu_run.sh device",
#                                     #            carry=[".whl"])
#   bash benches/gpu_run.sh train ... # there: benches/gpu_train_step.py (a LoRA step)
#   bash benches/gpu_run.sh micro ... # there: benches/bench_micro_batches.py --device cuda
#
# `prepare` builds the turnrl wheel (the abi3 feature, so the GPU machine's Python 3.12
# takes it) and downloads liger-kernel, the one package the GPU image lacks
# for benches/gpu_loss.py. `device` installs both into /tmp/site, then runs,
# in order, with every log under $OUT: the Triton compile check, the Triton
# backend's tests on CUDA (compiled kernels against the float64 reference),
# benches/gpu_loss.py at Qwen3-4B shapes and the row kernels' sweep
# (benches/gpu_row_kernels.py). Each step's status is printed;
# a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    set -e
    rm -rf .whl && mkdir -p .whl
    python -m maturin build --release --features abi3 --out .whl
    python -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5"
    # benches/gpu_train_step.py's model: transformers + PEFT and all they require (pinned
    # to the versions tested here),
    # for the GPU image's Python 3.12 (torch and triton are there already).
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d .whl/train \
         "accelerate==1.15.0" "annotated-doc==0.0.7" "annotated-types==0.8.0" \
        "anyio==4.16.0" "click==8.5.1" "filelock==4.2.11" "fsspec==2026.9.0" "h11==0.16.0" \
        "hf-xet==1.8.0" "httpcore2==2.16.2" "httpx2==2.16.2" "huggingface-hub==2.4.0" \
        "idna==3.20" "markdown-it-py==4.3.0" "mdurl==0.1.2" "peft==0.21.2" "psutil==7.2.2" \
        "pydantic==2.14.3" "pydantic-core==2.50.4" "pygments==2.21.0" "pyyaml==6.0.3" \
        "regex==2026.11.15" "rich==15.0.0" "safetensors==0.8.0" "shellingham==1.5.4" \
        "tokenizers==0.23.3" "tqdm==4.70.1" "transformers==5.23.0" "truststore==0.10.5" \
        "typer==0.29.2" "typing-inspection==0.4.5"
    du -sh .whl && ls .whl .whl/train
    ;;
train | micro)
    # there: run(command="bash benches/gpu_run.sh train", carry=[".whl"]), or
    #        run(command="bash benches/gpu_run.sh micro --hidden 2560 --layers 4", carry=[".whl"])
    out="${OUT:-/tmp/gpu-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl .whl/train/*.whl || exit 1
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
    if [ "$1" = train ]; then
        python3 benches/gpu_train_step.py "${@:2}" 2>&1 | tee "$out/train_step.log"
    else
        python3 benches/bench_micro_batches.py --device cuda "${@:2}" 2>&1 | tee "$out/micro.log"
    fi
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
    step row-kernels python3 benches/gpu_row_kernels.py
    ;;
*)
    echo "usage: bash benches/gpu_run.sh prepare|device|train" >&2
    exit 2
    ;;
esac
