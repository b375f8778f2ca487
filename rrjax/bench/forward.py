"""Prefill (forward) throughput: rrjax against transformers' torch forward on the same random weights.

    python -m rrjax.bench.forward [--preset 0.5b] [--batch 1] [--seq 256] [--layers N] [--dtype float32]

Prints tokens/s for both, the achieved FLOP/s, and the machine's limit as measured here: the best
matmul rate of a large square matmul (jax and torch), so MFU is against what this machine really does.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrjax import hardware
from rrjax.bench import median_seconds
from rrjax.bench import peer
from rrjax.model.qwen2 import Qwen2, Qwen2Config


def matmul_peak(dtype: str) -> dict[str, float]:
  # 2048^2 saturates a CPU; a GPU needs 8192^2 (at 2048^2 an H200 reaches only ~125 of ~800 TFLOP/s).
  n = 2048 if jax.default_backend() == "cpu" else 8192
  out = {"jax_matmul_flops": hardware.matmul_flops(dtype, n=n)}
  try:
    import torch
    ta = torch.ones((n, n), dtype=getattr(torch, dtype), device=peer.device())
    out["torch_matmul_flops"] = 2 * n**3 / median_seconds(peer.synced(lambda: ta @ ta), 5)
  except ImportError:
    pass
  return out


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m rrjax.bench.forward")
  p.add_argument("--preset", default="0.5b")
  p.add_argument("--layers", type=int, default=None, help="override the number of layers")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on accelerators")
  p.add_argument("--attention", default="auto")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)

  dtype = args.dtype or hardware.default_dtype()
  overrides = dict(param_dtype=dtype, dtype=dtype, attention=args.attention)
  if args.layers:
    overrides["num_layers"] = args.layers
  config = Qwen2Config.preset(args.preset, **overrides)
  model = Qwen2(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
  flops = config.forward_flops(args.batch, args.seq)
  n_tokens = args.batch * args.seq

  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  x = jnp.asarray(tokens)
  t_ours = median_seconds(lambda: fwd(state, x).block_until_ready(), args.repeats)
  result = {
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "model": config.name,
      "layers": config.num_layers, "dtype": dtype, "batch": args.batch, "seq": args.seq,
      "forward_gflop": flops / 1e9,
      "rrjax_tokens_per_s": n_tokens / t_ours, "rrjax_flops_per_s": flops / t_ours,
  }
  if not args.no_torch:
    try:
      import torch
    except ImportError:
      result["peer"] = "transformers not installed"
    else:
      ref = peer.torch_twin(config, peer.weights_of(model), dtype).eval()
      tt = torch.tensor(tokens, device=peer.device())

      def torch_forward():
        with torch.no_grad():
          return ref(tt).logits

      t_torch = median_seconds(peer.synced(torch_forward), args.repeats)
      with torch.no_grad():
        theirs = ref(tt).logits.float().cpu().numpy()
      diff = float(np.abs(theirs - np.asarray(fwd(state, x), np.float32)).max())
      result.update({"transformers_tokens_per_s": n_tokens / t_torch, "transformers_flops_per_s": flops / t_torch,
                     "speedup_vs_transformers": t_torch / t_ours, "max_abs_logit_diff": diff,
                     "torch_device": peer.device(), "torch_threads": torch.get_num_threads()})
  peak = matmul_peak(dtype)
  result.update(peak)
  best = max(peak.values())
  result["rrjax_mfu_vs_measured_matmul"] = result["rrjax_flops_per_s"] / best
  if "transformers_flops_per_s" in result:
    result["transformers_mfu_vs_measured_matmul"] = result["transformers_flops_per_s"] / best
  print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in result.items()}, indent=2))
  return result


if __name__ == "__main__":
  main()
