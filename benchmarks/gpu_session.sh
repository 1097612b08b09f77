#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one run (at most 9 minutes on one H100/H200), from the repo
# root on the GPU machine:
#
#   OUT=gpu_out bash benchmarks/gpu_session.sh          # results under $OUT (default gpu_out/)
#   bash benchmarks/gpu_session.sh tests                # the test suite on the GPU instead (needs
#                                                       # ml-collections: a wheel in .whl/, below)
#
# What it runs (each step under a time limit, so a slow one cannot eat the rest):
#   1. the machine: GPU name, driver, versions                          -> $OUT/gpu_env.txt
#   2. train steps of Small TF and GPT-2 against the PyTorch peers at batch 64, 200 fused steps per
#      call, float32 matmuls on both sides (torch's default)           -> train_b64_float32.json
#   3. the same at batch 256                                           -> train_b256_float32.json
#   4. batch 64 with TF32 matmuls on both sides (JAX's own GPU default) -> train_b64_tf32.json
#   5. LISTA-VM meta-training and inference throughput (no peer)       -> other.json
# Every step's output also goes to $OUT/log.txt. A JSON is rewritten after each benchmark, so a
# step stopped by its time limit keeps what it measured ("complete": false).
# The "10^6 steps (h)" column is the protocol time (Small TF <= 0.25 h, GPT-2 <= 0.5 h on
# one H100) projected from the measured step time; "ratio" is the peer's step time over ours.
#
# Nothing is installed: the benchmarks need jax, flax, optax, numpy, torch and transformers. A
# wheel folder .whl/ (e.g. ml-collections, for experiments.main) is installed to /tmp/site first
# when present.
set -uo pipefail
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${1:-}" = "tests" ]; then
  # Numerics on the GPU: the suite's tolerances were set on CPU (float32 everywhere).
  JAX_PLATFORMS=cuda timeout 540 $PY -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests_gpu.log"
  exit "${PIPESTATUS[0]}"
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"

# DEVICE and BENCH_ARGS (appended, so they win) exist for a smoke test of this script on a CPU:
#   DEVICE=cpu BENCH_ARGS="--steps=1 --repeats=1 --batches=8 --tasks=200 --no-peer" bash benchmarks/gpu_session.sh
run() {   # run LIMIT_S NAME ARGS...: one benchmarks.run call; its JSON under $OUT, output to log.txt
  local limit=$1 name=$2
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/log.txt"
  # shellcheck disable=SC2086
  timeout "$limit" $PY -m benchmarks.run --device="${DEVICE:-gpu}" --no-md --out="$OUT/$name.json" "$@" \
    ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/log.txt"
}
# Limits add up to 540 s, inside one 600 s device call.
run 180 train_b64_float32 --only=small_tf,gpt2 --batches=64 --steps=200 --repeats=5
run 150 train_b256_float32 --only=small_tf,gpt2 --batches=256 --steps=200 --repeats=5
run 120 train_b64_tf32 --only=small_tf,gpt2 --batches=64 --steps=200 --repeats=5 --matmul-precision=tf32
run 90 other --only=lista_vm,inference --no-peer --repeats=3
