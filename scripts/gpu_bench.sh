#!/usr/bin/env bash
# The GPU checks in one go (a machine with one NVIDIA GPU and jax[cuda], torch and transformers installed; grain
# and TFDS are not needed): the cuDNN attention test, prefill and decode throughput against transformers on the
# same card, and a 7B-shaped SFT step at ReasonRank's 23,552 tokens (measured peak memory next to preflight's
# figure for the same program, and MFU). Logs go to ${OUT:-runs/gpu_bench}. Each step has its own time limit
# and a failure does not stop the rest.
#   bash scripts/gpu_bench.sh [all|inference|train]     (train alone: under 8 minutes)
set -u
what=${1:-all}
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
if [ "$what" = all ] || [ "$what" = inference ]; then
  step cudnn_test 90 env JAX_PLATFORMS=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_model.py -k cudnn
  step forward_0.5b 120 "$py" -m rrjax.bench.forward --preset 0.5b --batch 8 --seq 2048
  step forward_0.5b_cudnn 90 "$py" -m rrjax.bench.forward --preset 0.5b --batch 8 --seq 2048 --attention cudnn --no-torch
  step forward_7b_4l 120 "$py" -m rrjax.bench.forward --preset 7b --layers 4 --batch 4 --seq 4096
  step decode_0.5b 150 "$py" -m rrjax.bench.decode --preset 0.5b --batch 32 --prompt-len 1024 --new-tokens 256
fi
if [ "$what" = all ] || [ "$what" = train ]; then
  # Qwen2.5-7B widths with 4 layers, f32 weights and AdamW, bf16 compute, cuDNN attention, remat 'full', the loss
  # a 1,024-position chunk at a time: one 23,552-token sequence, as the 7B SFT recipe runs it per GPU.
  step train_7b_4l_23552 240 "$py" -m rrjax.bench.train --preset 7b --layers 4 --batch 1 --seq 23552 \
    --dtype bfloat16 --attention cudnn --remat full --chunk 1024 --repeats 2 --no-torch --out "$out/train_7b_4l.json"
  # The same program compiled for one simulated device by preflight (cuDNN modelled by chunked attention).
  step preflight_7b_4l 180 env JAX_PLATFORMS=cpu "$py" -m rrjax.preflight --gin_file configs/sft/reasonrank_7b.gin \
    --gin_file configs/mesh/gpu_1.gin --gin_param "model_preset.num_layers = 4" --gin_param "TrainConfig.batch_size = 1" \
    --gin_param "TrainConfig.grad_accum = 1" --gin_param "model_preset.attention = 'cudnn'" --topology cpu:1 --hbm 141 \
    --json
  "$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
  bench = json.loads((out / "train_7b_4l.json").read_text())
  rep = json.loads((out / "preflight_7b_4l.log").read_text().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as e:
  print(f"=== train memory comparison: missing input ({e})")
else:
  measured, predicted = bench.get("peak_bytes_in_use"), rep["peak_bytes"]
  print(f"=== 7B-shaped SFT step (4 layers, 23,552 tokens): {bench['rrjax_tokens_per_s']:.0f} tokens/s, "
        f"MFU {bench['rrjax_mfu']:.3f} on {bench['device']}; peak_bytes_in_use "
        f"{(measured or 0) / 2**30:.2f} GiB, preflight cpu:1 {predicted / 2**30:.2f} GiB"
        + (f" (measured / preflight = {measured / predicted:.3f})" if measured else ""))
PY
fi
