"""What the machine can do: published accelerator peaks, or measured host rates on CPU.

Benchmarks and the training loop's MFU divide by these.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Published peak HBM bandwidth, bytes/s, by device_kind substring.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12, "TPU v4": 1.2e12,
                  "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v5": 2.765e12,
                  "TPU v6": 1.64e12}
# Published dense bf16 peak FLOP/s per chip, by device_kind substring.
PEAK_FLOPS_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
                   "TPU v6": 918e12}


# HBM per chip (GiB), by device_kind substring (longest names first where one contains another).
HBM_GIB = {"H200": 141, "H100": 80, "A100": 80, "L4": 24, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16,
           "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32, "TPU v6e": 32, "TPU v6": 32, "TPU7x": 192}


def device_memory_bytes(device) -> int | None:
  """A device's memory: what its runtime reports (bytes_limit), else the published HBM of its kind (devices of
  a compile-only TPU topology report nothing), else None."""
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only devices and some backends raise instead of returning None
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  for kind, gib in HBM_GIB.items():
    if kind.lower() in device.device_kind.lower():
      return gib * 2**30
  return None


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("rrjax_target_platform", default=None)


@contextlib.contextmanager
def target_platform(name: str):
  """Programs built inside are for `name` ("cpu", "gpu", "tpu"), whatever the host runs: an ahead-of-time
  compile for a TPU topology on a CPU machine must pick TPU defaults (dtype, attention kernel, cache)."""
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)


def platform() -> str:
  """The platform programs are being built for: `target_platform`'s, else JAX's default backend."""
  name = _TARGET.get() or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def host_available_bytes() -> int:
  """Memory the host can still give: /proc/meminfo's MemAvailable (page cache counts as free), else the
  free physical pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory_limit(devices) -> int | None:
  """The smallest memory among `devices` (see device_memory_bytes), or None where a device reports none (CPU)."""
  sizes = [device_memory_bytes(d) for d in devices]
  return None if not sizes or None in sizes else min(sizes)


def skip_absent_tpu() -> bool:
  """Keeps JAX from probing for a TPU that is not there; entry points call it before touching a device.

  With libtpu installed (`rrjax[tpu]`, for ahead-of-time TPU compiles) and JAX_PLATFORMS unset, JAX loads
  libtpu on its first device call and libtpu prints warnings on a machine without TPU chips. When this
  machine has neither TPU chips nor an NVIDIA GPU, JAX is set to the CPU platform; TPU topologies
  (`rrjax.preflight`) still load libtpu. Returns whether it changed anything.
  """
  if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return False
  try:
    from jax._src import hardware_utils, xla_bridge
    if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return False
    if hardware_utils.has_visible_nvidia_gpu():
      return False
  except (ImportError, AttributeError, OSError):  # another jax version's internals: leave JAX to itself
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def default_dtype(platform_name: str | None = None) -> str:
  """The compute dtype where a config does not say: float32 on CPU (where bf16 is slow and tests want exact
  results), bfloat16 on accelerators."""
  return "float32" if (platform_name or platform()) == "cpu" else "bfloat16"


def _published(table: dict[str, float]) -> tuple[float, str] | None:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  for kind, value in table.items():
    if kind.lower() in device.device_kind.lower():
      return value, f"{device.device_kind} published peak"
  return None


def host_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
  """Bytes/s of a large numpy copy (read + write), best of `repeats`."""
  src = np.ones(megabytes * 2**20 // 8, np.float64)
  dst = np.zeros_like(src)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
  return 2 * src.nbytes / best


def _best_jitted_seconds(fn, x, repeats: int) -> float:
  """Fastest of `repeats` calls of jit(fn)(x), after one that compiles."""
  f = jax.jit(fn)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def device_copy_bandwidth(megabytes: int = 2048, repeats: int = 5) -> float:
  """Bytes/s (read + write) of a jitted copy of a large array on the default device, best of `repeats`:
  what the memory really delivers, the decode roofline's limit."""
  x = jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)
  return 2 * x.nbytes / _best_jitted_seconds(lambda a: a + 1.0, x, repeats)


def peak_bandwidth() -> tuple[float, str]:
  return _published(PEAK_BANDWIDTH) or (host_bandwidth(), "measured host copy (numpy, 512 MiB)")


@functools.lru_cache(maxsize=4)
def matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n matmul on the default device, best of `repeats`."""
  return 2 * n**3 / _best_jitted_seconds(lambda a: a @ a, jnp.ones((n, n), dtype), repeats)


def peak_flops(dtype: str = "bfloat16") -> tuple[float, str]:
  """Per-device peak: the published bf16 figure on accelerators, a measured matmul rate on CPU."""
  published = _published(PEAK_FLOPS_BF16)
  if published:
    return published
  return matmul_flops("float32"), "measured jax matmul (2048^2, float32)"
