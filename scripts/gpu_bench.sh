#!/usr/bin/env bash
# The GPU checks, each part under 8 minutes (inference: the step limits add up to 470 s; train: 420 s): a machine with one NVIDIA
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
#   train_7b_4l      a 7B-shaped SFT step (4 layers, bf16, cuDNN, remat full) at ReasonRank's 23,552 tokens:
#                    measured peak_bytes_in_use next to preflight cpu:1's figure for the same program, and MFU
#   bash scripts/gpu_bench.sh [all|inference|train]   (one part fits a 15-minute device budget; all does not)
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
