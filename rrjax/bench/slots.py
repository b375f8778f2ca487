"""Decode step time of full slots at long live lengths, against the memory roofline:

    python -m rrjax.bench.slots [--preset 7b] [--layers N] [--slots 32,64,128] [--live 5000:9000] [--steps 32]

For each slot count B, every slot holds a live length drawn uniformly from the --live range (its cache
positions are there, their values do not matter for time), and the engine's decode program runs --steps
steps per call. A step must read the weights once and each slot's live keys/values; those bytes over the
measured step time, against the device's measured copy rate (a jitted copy of a large array), is the
roofline fraction (the goal on a GPU: >= 60%). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.slots", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="7b")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--slots", default="32,64,128", help="comma list of slot counts")
  ap.add_argument("--live", default="5000:9000", help="live lengths lo:hi, drawn uniformly per slot")
  ap.add_argument("--steps", type=int, default=32, help="decode steps per call")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from rrjax import engine, hardware
  from rrjax.bench import random_model
  from rrjax.engine import programs

  lo, hi = (int(x) for x in args.live.split(":"))
  config, model, mesh = random_model(args.preset, args.layers, args.dtype)
  dtype = config.dtype
  copy_rate = hardware.device_copy_bandwidth()
  c = config
  weight_bytes = c.param_count() * jnp.dtype(c.param_dtype).itemsize
  cache_dtype = engine.default_cache_dtype(c)
  kv_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(cache_dtype).itemsize
  rows = []
  print(f"device: {jax.devices()[0].device_kind}; model {c.name} ({c.param_count() / 1e9:.2f}B params, "
        f"{c.num_layers} layers, {dtype}); copy rate {copy_rate / 1e9:.0f} GB/s (measured)")
  for B in (int(x) for x in args.slots.split(",")):
    calls = args.repeats + 1
    length = engine.bucket(hi + calls * args.steps + 1, 64)
    eng = engine.Engine(model, engine.EngineConfig(slots=B, length=length, steps_per_call=args.steps))
    lengths = np.random.default_rng(B).integers(lo, hi + 1, B).astype(np.int32)
    V, M = c.vocab_size, eng.spec.stop_slots
    ones = np.ones((B,), np.int32)
    eng.state = jax.device_put(programs.SlotState(
        lengths, ones, ones, np.full((B,), 1 << 30, np.int32), 0 * ones, np.arange(B, dtype=np.int32), 0 * ones,
        np.zeros((B,), np.float32), np.ones((B,), np.float32), np.full((B, M), V, np.int32), np.ones((B,), bool)))
    t0 = time.perf_counter()
    decode = eng.programs.decode(eng.params)
    compile_s = time.perf_counter() - t0
    times = []
    for call in range(calls):
      t = time.perf_counter()
      out = decode(eng.params, eng.cache, eng.state, np.int32(args.steps), np.bool_(False))
      jax.block_until_ready(out)
      eng.cache, eng.state = out.cache, out.state
      if call:  # the first call warms up
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times)) / args.steps
    live = float(lengths.mean()) + args.steps * (calls / 2)  # mean live length over the timed calls
    step_bytes = weight_bytes + B * live * kv_token
    row = {"slots": B, "slot_length": length, "mean_live": live, "ms_per_step": step_s * 1e3,
           "tokens_per_s": B / step_s, "gb_per_s": step_bytes / step_s / 1e9,
           "roofline_fraction": step_bytes / step_s / copy_rate, "kernel": eng.spec.kernel, "compile_s": compile_s}
    rows.append(row)
    print(f"{B:4d} slots (live {lo}-{hi}, mean {live:.0f}; kernel {row['kernel']}): {row['ms_per_step']:.2f} ms/step, "
          f"{row['tokens_per_s']:,.0f} tokens/s, weights + live KV {step_bytes / 1e9:.1f} GB/step = "
          f"{row['gb_per_s']:.0f} GB/s = {row['roofline_fraction']:.0%} of the copy rate")
    eng.release()
    del eng, decode, out
  if args.json:
    print(json.dumps({"device": jax.devices()[0].device_kind, "model": c.name, "copy_rate": copy_rate, "rows": rows}))
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.slots")
