"""Run logging: a progress line on stdout, metrics.jsonl, TensorBoard scalars, and a PNG of the curves.

On resume the JSONL is cut back to the restored step, so every step appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Mapping

from rrjax import fileio

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, last_step: int) -> None:
  """Drops records after `last_step` (steps logged after the checkpoint a resume starts from)."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if record.get("step", 0) <= last_step:
      kept.append(line)
  fileio.write_text(path, "".join(k + "\n" for k in kept))


class MetricsLogger:
  def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
    self.run_dir = Path(run_dir)
    self.enabled = enabled
    self.path = self.run_dir / METRICS_FILE
    self._tb = None
    if enabled:
      truncate_metrics(self.path, resume_step)
      self._file = self.path.open("a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)
      except ImportError:  # TensorBoard is optional; the JSONL has everything
        self._tb = None
    self._t0 = time.time()

  def text(self, tag: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, "    " + text.replace("\n", "\n    "))

  def log(self, step: int, metrics: Mapping[str, float], *, total_steps: int | None = None,
          echo: bool = True) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": round(time.time() - self._t0, 3)}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._tb is not None:
      for k, v in metrics.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(k, float(v), step)
    if echo:
      shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
      of = f"/{total_steps}" if total_steps else ""
      print(f"step {step}{of} {shown}", file=sys.stdout, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(v) -> str:
  v = float(v)
  return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


def read_metrics(path: str | os.PathLike) -> list[dict]:
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: str | os.PathLike, keys: tuple[str, ...] = ("loss", "reward_mean", "lr", "grad_norm"),
         out: str | os.PathLike | None = None) -> Path | None:
  """Saves curves of the given metrics (those present) as a PNG; returns its path."""
  records = read_metrics(run_dir)
  present = [k for k in keys if any(k in r for r in records)]
  if not present:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
  for ax, key in zip(axes[0], present):
    xs = [r["step"] for r in records if key in r]
    ys = [r[key] for r in records if key in r]
    ax.plot(xs, ys)
    ax.set_title(key)
    ax.set_xlabel("step")
  fig.tight_layout()
  return save_png(fig, Path(out) if out else Path(run_dir) / "curves.png", dpi=80)


def save_png(fig, path: str | os.PathLike, dpi: int = 80) -> Path:
  """Writes a matplotlib figure atomically (a temporary file, then rename) and closes it."""
  import matplotlib.pyplot as plt
  path = Path(path)
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi, format="png")
  finally:
    plt.close(fig)
  return path
