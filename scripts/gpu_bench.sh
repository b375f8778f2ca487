#!/usr/bin/env bash
# The GPU checks in one go (a machine with one NVIDIA GPU and jax[cuda], torch and transformers installed):
# the cuDNN attention test, then prefill and decode throughput against transformers on the
# same card. Logs go to ${OUT:-runs/gpu_bench}. Each step has its own time limit and a failure does not
# stop the rest.
#   bash scripts/gpu_bench.sh
set -u
out=${OUT:-runs/gpu_bench}
mkdir -p "$out"
py=${PYTHON:-python3}
PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
export PYTHONPATH PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'torch', torch.__version__, 'transformers', transformers.__version__)"
step cudnn_test 90 env JAX_PLATFORMS=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_model.py -k cudnn
step forward_0.5b 120 "$py" -m rrjax.bench.forward --preset 0.5b --batch 8 --seq 2048
step forward_0.5b_cudnn 90 "$py" -m rrjax.bench.forward --preset 0.5b --batch 8 --seq 2048 --attention cudnn --no-torch
step forward_7b_4l 120 "$py" -m rrjax.bench.forward --preset 7b --layers 4 --batch 4 --seq 4096
step decode_0.5b 150 "$py" -m rrjax.bench.decode --preset 0.5b --batch 32 --prompt-len 1024 --new-tokens 256
