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
