#!/usr/bin/env bash
# The GPU checks in one go, under 8 minutes (the step limits below add up to 470 s): a machine with one NVIDIA
# GPU and jax[cuda] (0.11 or later), torch and transformers installed; grain and tensorflow_datasets are not
# needed. Logs go to ${OUT:-runs/gpu_bench}; each step has its own time limit and a failure does not stop the
# rest. What each step of the inference part measures:
#   gpu_tests        the cuDNN attention tests (prefill, and decode slots with key/value lengths vs XLA)
#   slots_7b         Qwen2.5-7B-shaped bf16 decode (random weights, all 28 layers): ms/step at 32, 64 and 128
#                    slots with live lengths drawn in 5k-9k; GB/s of weights + live KV against the measured
#                    copy rate (goal >= 60%)
#   prefill_7b       7B prefill MFU at 6,144 tokens with cuDNN attention
#   engine_7b        bench.engine on the 7B shape (scripted ReasonRank-like lengths): engine vs static batching
#   fidelity_0.5b    bf16 logits (rrjax with cuDNN and with XLA attention, transformers) against one float32
#   fidelity_7b      reference on the same weights: 0.5B (24 layers) and 7B widths (4 layers, per depth)
#   rerank_7b        bench.rerank on the 7B shape at top-100, windows 20/10, scripted chains: listwise async vs
#                    lockstep windows/s, and listwise vs Rank1 pointwise, at equal slots
#   bash scripts/gpu_bench.sh [all|inference]
set -u
what=${1:-all}
out=${OUT:-runs/gpu_bench}
mkdir -p "$out"
py=${PYTHON:-python3}
PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
export PYTHONPATH PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_PLATFORMS=cuda

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
if [ "$what" = all ] || [ "$what" = inference ]; then
  step gpu_tests 40 "$py" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_engine.py -k "cudnn"
  step slots_7b 85 "$py" -m rrjax.bench.slots --preset 7b --slots 32,64,128 --live 5000:9000 --steps 32 --json
  step prefill_7b 45 "$py" -m rrjax.bench.forward --preset 7b --batch 1 --seq 6144 --attention cudnn --no-torch
  step engine_7b 110 "$py" -m rrjax.bench.engine --preset 7b --requests 64 --slots 32 --prompt-len 1024 \
    --max-new-tokens 1024 --prefill-group 8 --no-hf --json
  step fidelity_0.5b 35 "$py" -m rrjax.bench.fidelity --preset 0.5b --attention xla,cudnn --json
  step fidelity_7b 55 "$py" -m rrjax.bench.fidelity --preset 7b --layers 4 --per-layer --attention xla,cudnn --json
  step rerank_7b 100 "$py" -m rrjax.bench.rerank --preset 7b --queries 8 --slots 8 --max-new-tokens 256 --json
fi
