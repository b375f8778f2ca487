"""Continuous batching against static batching and transformers, on a ReasonRank-shaped workload:

    python -m rrjax.bench.engine [--preset tiny] [--requests N] [--slots B] [--prompt-len P]
                                 [--max-new-tokens C] [--lengths-file F] [--no-hf] [--json]

N requests of P random prompt tokens whose generated lengths are scripted (stop ids off, each request's
budget is its length): drawn from a clipped log-normal with mean about C/4 whose batches of B have a max
about 3.4x the mean (ReasonRank's chains: ~750 tokens on average against a 3,172 cap, some cut there), or
read one integer per line from F. Three runs on the same weights, after an ahead-of-time compile of the
engine's programs (which static batching shares):
- the engine with B slots (rows refilled from the queue as they finish);
- static batching, today's algorithm before the engine: consecutive batches of B, each running until its
  longest row is done (the same compiled programs, so only the schedule differs);
- transformers `generate` in batches of B (each batch to its longest row), unless --no-hf.
Useful tokens/s counts each request's own tokens only. The roofline is the time this engine schedule needs
at the machine's limits: prefill FLOPs at the measured matmul peak, plus per decode step the weights and
the live keys/values (each slot's own length, not the allocated cache) at the measured memory bandwidth.
With --json the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TAIL_SIGMA = 2.4  # log-normal sigma: batches of 8 have a max ~3.4x the mean when clipped at 4x the mean


def scripted_lengths(n: int, cap: int, seed: int = 0) -> list[int]:
  """n lengths in [1, cap] from a log-normal clipped at cap, its mu set so that the mean is about cap / 4."""
  probe = np.random.default_rng(seed + 1).normal(0.0, TAIL_SIGMA, 100_000)
  lo, hi = -10.0, np.log(cap) + 10.0
  for _ in range(60):  # bisection on mu: the clipped mean grows with it
    mu = (lo + hi) / 2
    lo, hi = (mu, hi) if np.clip(np.exp(mu + probe), 1, cap).mean() < cap / 4 else (lo, mu)
  draws = np.random.default_rng(seed).normal(mu, TAIL_SIGMA, n)
  return [int(x) for x in np.clip(np.round(np.exp(draws)), 1, cap)]


def read_lengths(path: str) -> list[int]:
  out = []
  for i, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      value = int(line)
    except ValueError:
      raise ValueError(f"{path}:{i}: expected one integer per line, got {line.strip()!r}") from None
    if value < 1:
      raise ValueError(f"{path}:{i}: lengths must be >= 1, got {value}")
    out.append(value)
  if not out:
    raise ValueError(f"{path}: no lengths")
  return out


def batch_max_over_mean(lengths, slots: int) -> float:
  batches = [lengths[i:i + slots] for i in range(0, len(lengths), slots)]
  return float(np.mean([max(b) for b in batches]) / np.mean(lengths))


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.engine", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--slots", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=256)
  ap.add_argument("--max-new-tokens", type=int, default=512, help="the cap C (lengths are drawn up to it)")
  ap.add_argument("--lengths-file", help="scripted lengths, one integer per line (cycled over the requests)")
  ap.add_argument("--steps-per-call", type=int, default=64)
  ap.add_argument("--prefill-group", type=int, default=None, help="prompts per prefill (default: the slots)")
  ap.add_argument("--dtype", default=None, help="compute/param dtype (default: f32 on CPU, bf16 else)")
  ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
  ap.add_argument("--json", action="store_true", help="end with one JSON line")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from rrjax import engine, hardware
  from rrjax.bench import random_model

  N, B, P = args.requests, args.slots, args.prompt_len
  if args.lengths_file:
    pool = read_lengths(args.lengths_file)
    lengths = [pool[i % len(pool)] for i in range(N)]
  else:
    lengths = scripted_lengths(N, args.max_new_tokens)
  C = max(lengths)
  config, model, mesh = random_model(args.preset, args.layers, args.dtype)
  dtype = config.dtype
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, min(config.vocab_size, 150_000), (N, P)).tolist()
  length = engine.bucket(P + C, 64)

  shape = engine.EngineConfig(slots=B, length=length, steps_per_call=args.steps_per_call,
                              prefill_group=args.prefill_group or 0)

  def make(**kw):
    return engine.Engine(model, shape, **kw)

  def run_engine():
    eng = make()
    reqs = [engine.Request(p, n, id=i) for i, (p, n) in enumerate(zip(prompts, lengths))]
    t = time.perf_counter()
    out = eng.run(reqs)
    seconds = time.perf_counter() - t
    assert [len(r.tokens) for r in out] == lengths
    eng.release()
    return seconds, eng.stats

  def run_static():
    eng = make(leave_early=False)
    t = time.perf_counter()
    for start in range(0, N, B):
      top = max(lengths[start:start + B])  # every row of the batch runs until the longest is done
      eng.run([engine.Request(prompts[i], top, id=i) for i in range(start, min(start + B, N))])
    seconds = time.perf_counter() - t
    eng.release()
    return seconds, eng.stats

  # Ahead-of-time warm-up: decode, and prefill and insert for every group size; static batching runs the
  # same programs.
  before = engine.compilation_count()
  warm = make()
  warm.warmup([P])
  warm.release()
  engine_s, stats = run_engine()
  static_s, static_stats = run_static()
  compiled = engine.compilation_count() - before
  useful = sum(lengths)

  hf_s = None
  if not args.no_hf:
    import torch

    from rrjax.bench import peer

    ref = peer.torch_twin(config, peer.weights_of(model), dtype=dtype).eval()

    @peer.synced
    def hf_batch(rows, top):
      ids = torch.tensor([prompts[i] for i in rows], device=peer.device())
      with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=top, min_new_tokens=top,
                     do_sample=False, eos_token_id=None, pad_token_id=0)

    hf_batch(range(min(B, N)), 2)  # warm-up
    t = time.perf_counter()
    for start in range(0, N, B):
      hf_batch(range(start, min(start + B, N)), max(lengths[start:start + B]))
    hf_s = time.perf_counter() - t

  # The engine schedule at the machine's limits: prefill FLOPs at the matmul peak; per decode step the
  # weights, and each live slot's own keys/values, at the memory bandwidth.
  c = config
  flops, flops_source = hardware.peak_flops(dtype)
  bandwidth, bw_source = hardware.peak_bandwidth()
  weight_bytes = c.param_count() * jnp.dtype(c.param_dtype).itemsize
  kv_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(engine.default_cache_dtype(c)).itemsize
  # Request i's decode steps t = 1 .. n_i - 1 read its P + t keys (its first token comes from prefill).
  kv_bytes = kv_token * sum((n - 1) * P + (n - 1) * n / 2 for n in lengths)
  roofline_s = N * c.forward_flops(1, P) / flops + (stats.decode_steps * weight_bytes + kv_bytes) / bandwidth

  result = {
      "device": f"{jax.devices()[0].device_kind}", "model": c.name, "layers": c.num_layers, "dtype": dtype,
      "requests": N, "slots": B, "prompt_len": P, "max_new_tokens": args.max_new_tokens,
      "mean_length": float(np.mean(lengths)), "max_length": C,
      "batch_max_over_mean": batch_max_over_mean(lengths, B), "useful_tokens": useful,
      "engine_seconds": engine_s, "engine_tokens_per_s": useful / engine_s,
      "static_seconds": static_s, "static_tokens_per_s": useful / static_s,
      "hf_seconds": hf_s, "hf_tokens_per_s": useful / hf_s if hf_s else None,
      "engine_vs_static": static_s / engine_s, "engine_vs_hf": hf_s / engine_s if hf_s else None,
      "occupancy": stats.occupancy, "static_occupancy": (useful - N) / max(static_stats.slot_steps, 1),
      "decode_calls": stats.decode_calls, "decode_steps": stats.decode_steps,
      "static_decode_steps": static_stats.decode_steps, "compiled_programs": compiled,
      "prefill_seconds": stats.prefill_seconds, "decode_seconds": stats.decode_seconds,
      "roofline_seconds": roofline_s, "roofline_fraction": roofline_s / engine_s,
      "peak_flops": flops, "peak_flops_source": flops_source, "bandwidth": bandwidth, "bandwidth_source": bw_source,
  }
  hf = f"{result['hf_tokens_per_s']:,.0f} tokens/s ({hf_s:.1f} s)" if hf_s else "skipped (--no-hf)"
  print(f"device: {result['device']} x{jax.device_count()}; model {c.name} ({c.param_count() / 1e6:.1f}M params, "
        f"{c.num_layers} layers, {dtype}); {N} requests, prompt {P}, lengths mean {result['mean_length']:.0f} max {C} "
        f"(cap {args.max_new_tokens}), batch-max/mean {result['batch_max_over_mean']:.2f} at {B} slots")
  print(f"engine  {result['engine_tokens_per_s']:,.0f} useful tokens/s ({engine_s:.1f} s; occupancy "
        f"{stats.occupancy:.0%}, {stats.decode_calls} decode calls, {stats.decode_steps} steps, prefill "
        f"{stats.prefill_seconds:.1f} s; {compiled} compiled programs)")
  print(f"static  {result['static_tokens_per_s']:,.0f} useful tokens/s ({static_s:.1f} s; "
        f"{static_stats.decode_steps} steps, occupancy {result['static_occupancy']:.0%})")
  print(f"HF      {hf}")
  print(f"engine / static {result['engine_vs_static']:.2f}x" +
        (f", engine / HF {result['engine_vs_hf']:.2f}x" if hf_s else ""))
  print(f"roofline: {roofline_s:.2f} s for this schedule (prefill at {flops / 1e9:.0f} GFLOP/s, {flops_source}; "
        f"weights + live KV at {bandwidth / 1e9:.1f} GB/s, {bw_source}): engine at {result['roofline_fraction']:.0%}")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.engine")
