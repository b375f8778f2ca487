"""Training-step throughput: rrjax's jitted SFT step against transformers' torch forward+backward+AdamW on
the same weights, same machine, one run.

    python -m rrjax.bench.train [--preset 0.5b] [--layers N] [--batch 1] [--seq 256] [--repeats 3]
        [--dtype bfloat16] [--attention auto] [--remat none] [--chunk 1024] [--no-torch]

Prints tokens/s for both, the achieved FLOP/s (3 x forward FLOPs per step) and MFU against the device
peak (published bf16 peak on GPU/TPU, a measured matmul rate on CPU), and on accelerators the device's
`peak_bytes_in_use` (compare with `python -m rrjax.preflight --topology cpu:1` for the same shapes). The step
is rrjax.train.sft's, with AdamW and global-norm clipping as the recipes configure it. Needs neither grain
nor TFDS.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrjax import hardware, sharding
from rrjax.bench import median_seconds
from rrjax.bench import peer
from rrjax.model.qwen2 import Qwen2, Qwen2Config
from rrjax.train import optim, sft
from rrjax.train import state as state_lib
from rrjax.train.config import OptimizerConfig, TrainConfig


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m rrjax.bench.train")
  p.add_argument("--preset", default="0.5b")
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--dtype", default=None, help="compute dtype (default f32 on CPU, bf16 on accelerators)")
  p.add_argument("--remat", default="none")
  p.add_argument("--attention", default="auto")
  p.add_argument("--chunk", type=int, default=TrainConfig.loss_chunk_tokens, help="loss positions per chunk")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default=None, help="also write the result JSON here")
  args = p.parse_args(argv)

  dtype = args.dtype or hardware.default_dtype()
  overrides = dict(param_dtype="float32", dtype=dtype, remat=args.remat, attention=args.attention)
  if args.layers:
    overrides["num_layers"] = args.layers
  config = Qwen2Config.preset(args.preset, **overrides)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
  tx, lr = optim.make_optimizer(OptimizerConfig(lr=1e-5, warmup_ratio=0.0), 1000)
  lay = state_lib.layout(lambda: Qwen2(config, rngs=nnx.Rngs(0)), tx, mesh)
  model = sharding.create_sharded(lambda: Qwen2(config, rngs=nnx.Rngs(0)), mesh)
  weights = None if args.no_torch else peer.weights_of(model)  # before donation frees them
  state = state_lib.init_state(model, tx, lay, 0)
  rng = np.random.default_rng(0)
  B, T = args.batch, args.seq
  batch = {"tokens": rng.integers(0, config.vocab_size, (B, T)).astype(np.int32),
           "loss_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
  step = jax.jit(sft.make_train_step(lay.graphdef, tx, lr, chunk_tokens=args.chunk), in_shardings=(lay.shardings, None),
                 out_shardings=(lay.shardings, None), donate_argnums=(0,))
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  holder = {"state": state}

  def ours():
    with jax.set_mesh(mesh):
      holder["state"], m = step(holder["state"], device_batch)
    jax.block_until_ready(m)

  t_ours = median_seconds(ours, args.repeats)
  flops = 3 * config.forward_flops(B, T)
  peak, peak_source = hardware.peak_flops()
  peak *= jax.device_count()
  result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "model": config.name,
            "layers": config.num_layers, "compute_dtype": dtype, "batch": B, "seq": T,
            "step_gflop": flops / 1e9, "rrjax_tokens_per_s": B * T / t_ours, "rrjax_flops_per_s": flops / t_ours,
            "rrjax_mfu": flops / t_ours / peak, "peak_flops": peak, "peak_source": peak_source,
            "attention": args.attention, "remat": args.remat, "loss_chunk_tokens": args.chunk}
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU and some backends have none
    stats = {}
  if "peak_bytes_in_use" in stats:
    result["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    result["peak_gib_in_use"] = stats["peak_bytes_in_use"] / 2**30

  if not args.no_torch:
    try:
      import torch
    except ImportError:
      result["peer"] = "transformers not installed"
    else:
      ref = peer.torch_twin(config, weights).train()
      opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)
      tokens = torch.tensor(batch["tokens"], dtype=torch.long, device=peer.device())
      autocast = dtype == "bfloat16"

      def theirs():
        opt.zero_grad()
        with torch.autocast(peer.device(), dtype=torch.bfloat16, enabled=autocast):
          loss = ref(tokens, labels=tokens).loss
        loss.backward()
        opt.step()

      t_torch = median_seconds(peer.synced(theirs), args.repeats)
      result.update({"transformers_tokens_per_s": B * T / t_torch, "transformers_flops_per_s": flops / t_torch,
                     "transformers_mfu": flops / t_torch / peak, "speedup_vs_transformers": t_torch / t_ours,
                     "torch_device": peer.device(), "torch_threads": torch.get_num_threads()})
  print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in result.items()}, indent=2))
  if args.out:
    from rrjax import fileio
    fileio.write_text(args.out, json.dumps(result) + "\n")
  return result


if __name__ == "__main__":
  main()
