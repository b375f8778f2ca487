"""Decode benchmark: `python -m rrjax.bench.decode [--preset tiny|0.5b|...] [--batch 8] [--prompt-len 512]
[--new-tokens 128] [--layers N] [--no-hf]`.

Times `rrjax.generate` (greedy, after a warm-up compile) against transformers `generate` (torch, same
random weights, same prompts, same machine, one run each), and compares decode speed with the
memory-bandwidth roofline: every decode step must read all weights plus the live keys/values (each row's
filled context, not the allocated cache), so those bytes per step / step time is the achieved bandwidth.
The attention kernel that reads only live keys (cuDNN with lengths, the TPU ragged paged kernel) reads
just that; XLA's reads every allocated position, which is printed too. The limit is a measured host
memory bandwidth (large numpy copy) on CPU, or the device's published peak on GPU/TPU.

Decode time is the time of an N-token call minus that of a 1-token call on the same compiled programs
(both include the prefill), divided by N - 1 steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rrjax import decode, engine, hardware
from rrjax.bench import peer
from rrjax.model import hf
from rrjax.hardware import peak_bandwidth
from rrjax.model.qwen2 import KVCache, Qwen2Config


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _best(fn, repeats: int = 3) -> float:
  """The fastest of `repeats` runs: both sides alike, so a busy moment on a shared machine hits neither."""
  return min(_timed(fn) for _ in range(repeats))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=512)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--dtype", default=None, help="compute/param dtype (default: f32 on CPU, bf16 else)")
  parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
  args = parser.parse_args(argv)

  import torch
  import transformers

  dtype = args.dtype or hardware.default_dtype()
  overrides = {"num_layers": args.layers} if args.layers else {}
  config = Qwen2Config.preset(args.preset, dtype=dtype, param_dtype=dtype, **overrides)
  torch.manual_seed(0)
  ref = transformers.Qwen2ForCausalLM(peer.torch_config(config)).float().eval()
  state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  model = hf.from_tensors(config, lambda name, shape: state[name])
  del state

  B, P, N = args.batch, args.prompt_len, args.new_tokens
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, min(config.vocab_size, 150_000), (B, P)).tolist()
  buckets = decode.Buckets(min_new_tokens=N)  # the 1-token and N-token calls share their programs
  run = lambda n: decode.generate(model, prompts, max_new_tokens=n, stop_ids=(),
                                 engine=decode.EngineConfig(buckets=buckets))

  compile_s = _timed(lambda: run(N))
  ours_one = _best(lambda: run(1))
  # Host overhead: a warm 1-token call's time outside the engine's prefill and decode (planning, engine
  # set-up, requests and results), paid again by every call whatever the model's size.
  t0 = time.perf_counter()
  stats = run(1).engine
  overhead = time.perf_counter() - t0 - stats["prefill_seconds"] - stats["decode_seconds"]
  ours_full = _best(lambda: run(N))
  ours_step = max(ours_full - ours_one, 1e-9) / (N - 1)

  c = config
  weight_bytes = config.param_count() * jnp.dtype(c.param_dtype).itemsize
  cache_dtype = engine.default_cache_dtype(c)
  kv_per_token = KVCache.nbytes(c, B, 1, cache_dtype)
  live = P + N / 2  # mean filled context over the decode
  step_bytes = weight_bytes + kv_per_token * live
  kernel = engine.decode_kernel(c, cache_dtype)
  allocated = buckets.prompt(P) + buckets.new_tokens(N)  # what each slot holds
  read_bytes = weight_bytes + kv_per_token * (live if kernel != "xla" else allocated)
  bw, bw_source = peak_bandwidth()

  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; model {c.name} "
        f"({config.param_count() / 1e6:.1f}M params, {c.num_layers} layers, {dtype}); "
        f"batch {B}, prompt {P}, new tokens {N}")
  print(f"rrjax  compile+first run {compile_s:.2f} s; prefill+1 token {ours_one * 1e3:.1f} ms; "
        f"decode {ours_step * 1e3:.2f} ms/step = {B / ours_step:,.0f} tokens/s; "
        f"host overhead {overhead * 1e3:.1f} ms/call")
  if not args.no_hf:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = ref.to(device=peer.device(), dtype=torch_dtype)
    ids = torch.tensor(prompts, device=peer.device())
    mask = torch.ones_like(ids)

    @peer.synced
    def hf_run(n):
      with torch.no_grad():
        ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     eos_token_id=None, pad_token_id=0)

    hf_run(2)  # warm-up
    hf_one = _best(lambda: hf_run(1))
    hf_full = _best(lambda: hf_run(N))
    hf_step = max(hf_full - hf_one, 1e-9) / (N - 1)
    print(f"HF     prefill+1 token {hf_one * 1e3:.1f} ms; decode {hf_step * 1e3:.2f} ms/step = "
          f"{B / hf_step:,.0f} tokens/s (torch {torch.__version__} on {peer.device()}, {torch.get_num_threads()} threads)")
    print(f"speed-up rrjax / HF: decode {hf_step / ours_step:.2f}x, end to end {hf_full / ours_full:.2f}x")
  print(f"roofline: {step_bytes / 1e6:.1f} MB needed per decode step (weights {weight_bytes / 1e6:.1f} MB + "
        f"live KV {kv_per_token * live / 1e6:.1f} MB); rrjax achieves {step_bytes / ours_step / 1e9:.1f} GB/s "
        f"= {step_bytes / ours_step / bw:.0%} of {bw / 1e9:.1f} GB/s ({bw_source}); "
        f"bound {bw / step_bytes * B:,.0f} tokens/s")
  print(f"attention kernel {kernel}: reads {read_bytes / 1e6:.1f} MB per step "
        f"({'live keys only' if kernel != 'xla' else f'all {allocated} allocated positions per slot'}), "
        f"{read_bytes / ours_step / 1e9:.1f} GB/s")


if __name__ == "__main__":
  main()
