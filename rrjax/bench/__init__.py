"""Benchmarks: `python -m rrjax.bench.<name>` prints rrjax's figure, the peer's, and the machine's limit."""

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls, after one warm-up (compile) call."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def random_model(preset: str, layers: int | None = None, dtype: str | None = None):
  """(config, model, mesh): a preset with random weights (`layers` overriding its depth) in `dtype` (default:
  the platform's), built straight onto a one-device mesh."""
  import jax
  from flax import nnx

  from rrjax import hardware, sharding
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  dtype = dtype or hardware.default_dtype()
  overrides = {"num_layers": layers} if layers else {}
  config = Qwen2Config.preset(preset, dtype=dtype, param_dtype=dtype, **overrides)
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  return config, sharding.create_sharded(lambda: Qwen2(config, rngs=nnx.Rngs(0)), mesh), mesh
