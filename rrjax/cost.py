"""What a compiled program costs (`python -m rrjax.preflight --cost`): per device, its matrix FLOPs and HBM bytes
counted from the compiled HLO (rrjax.hlo_count: loops multiplied by their trip counts, custom kernels by the
analytic attention formula), the useful work of the same program from the architecture and its shapes, and a
roofline time on a chip kind: max(FLOPs / peak, bytes / bandwidth), a lower bound.

Useful work (`useful`): training 6 x matmul parameters x tokens plus causal attention (3 x the forward; 2 x where
the base is frozen: LoRA computes no weight gradients for it); its bytes the weights read by the forward and the
backward pass plus the optimizer's update (parameter, gradient and both AdamW moments read in float32, parameter
and moments written). Prefill 2 x parameters x tokens plus attention, bytes the weights and the KV written; a
decode step 2 x parameters per slot plus attention over the live context, bytes the weights plus the live KV
(not the allocated cache). The remat policy's recompute is its own term (`remat_flops`), outside useful.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rrjax.hlo_count import causal_pairs, count_hlo, counted_note

# --- chips ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  source: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# Published per-chip peaks; dense bf16 (NVIDIA's pages print BF16 with 2:4 sparsity, twice the dense figure).
CHIPS = {c.kind: c for c in (
    Chip("v4", 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4 (275 TFLOPS bf16, HBM2 1200 GBps)"),
    Chip("v5e", 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, HBM2 819 GBps)"),
    Chip("v5p", 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, HBM2e 2765 GBps)"),
    Chip("v6e", 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, HBM 1638 GBps)"),
    Chip("A100", 312e12, 2039e9, "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
         "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 80GB SXM: BF16 312 TFLOPS, 2,039 GB/s)"),
    Chip("H100", 989e12, 3.35e12, "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 1,979 TFLOPS "
         "with sparsity, 3.35 TB/s)"),
    Chip("H200", 989e12, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: BF16 1,979 TFLOPS "
         "with sparsity, 4.8 TB/s)"),
)}
# device_kind (as jax reports it) -> chip kind; longest names first where one contains another
_DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
                 ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v4", "v4"), ("H200", "H200"), ("H100", "H100"),
                 ("A100", "A100"))


def chip(kind: str) -> Chip:
  """The table's chip of that kind (case-insensitive); ValueError naming it otherwise."""
  for name, c in CHIPS.items():
    if name.lower() == kind.lower():
      return c
  raise ValueError(f"--chip {kind!r}: not a chip kind in rrjax.cost.CHIPS ({', '.join(CHIPS)})")


def chip_for_device_kind(device_kind: str) -> Chip | None:
  for name, kind in _DEVICE_KINDS:
    if name.lower() in device_kind.lower():
      return CHIPS[kind]
  return None

# --- useful work ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Work:
  """What one program computes, for its useful work: `rows` sequences of `tokens` positions each (a decode
  step: 1) attending to `context` keys each (self-attention: the tokens themselves); `kind` one of train
  (forward + backward), forward (`passes` models: policy and reference), prefill, insert (copies KV), decode
  (one step); `logit_tokens` positions per row through the LM head (None: all); `calls`: runs per training step
  or per rerank."""

  config: Any  # rrjax.model.qwen2.Qwen2Config
  kind: str
  rows: int
  tokens: int
  context: int = 0
  passes: int = 1
  logit_tokens: int | None = None
  frozen_base: bool = False  # LoRA: the base gets no weight gradients
  calls: float = 1.0
  cache_itemsize: int = 2


def _layer_flops_per_token(c) -> dict[str, float]:
  D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  return {"qkv": 2.0 * (D * N * H + 2 * D * K * H), "o": 2.0 * N * H * D, "gate_up": 2.0 * 2 * D * F,
          "down": 2.0 * D * F}


# Matmuls each remat policy recomputes in the backward pass (rrjax.model.qwen2.REMAT_POLICIES). Never the down
# projection: its output is the layer's output, which no gradient needs (jax drops it from the recompute).
_RECOMPUTED = {"none": (), "full": ("qkv", "o", "gate_up", "attn"), "qkv": ("o", "gate_up", "attn"),
               "qkv_attn": ("o", "gate_up"), "dots": (), "dots_no_batch": ("attn",)}


def useful(work: Work) -> dict[str, float]:
  """Global (all devices) useful FLOPs, HBM bytes and the remat policy's recompute FLOPs of one call."""
  c, w = work.config, work
  per_token = _layer_flops_per_token(c)
  layer = sum(per_token.values())
  head = 2.0 * c.hidden_size * c.vocab_size
  L, N, H, K = c.num_layers, c.num_heads, c.head_dim, c.num_kv_heads
  context = w.context or w.tokens
  pairs = causal_pairs(w.tokens, context) if w.kind != "decode" else context
  attn = 4.0 * N * H * pairs  # QK^T and PV over the causal pairs, per row and layer
  logits = w.tokens if w.logit_tokens is None else w.logit_tokens
  forward = w.rows * (L * (w.tokens * layer + attn) + logits * head)
  kv_row = L * 2 * K * H * w.cache_itemsize  # bytes of one position's keys and values, all layers
  weights = sum(math.prod(s) for s in _weight_shapes(c)) * _dtype_bytes(c.dtype)
  weights_param = sum(math.prod(s) for s in _weight_shapes(c)) * _dtype_bytes(c.param_dtype)
  # weight_bytes: read by every model replica (per device: its tensor shard); hbm_bytes: the rest, split evenly
  out = {"flops": 0.0, "hbm_bytes": 0.0, "weight_bytes": 0.0, "remat_flops": 0.0}
  if w.kind == "train":
    out["flops"] = (2 if w.frozen_base else 3) * forward
    rec = _RECOMPUTED.get(c.remat, ())
    out["remat_flops"] = w.rows * L * (w.tokens * sum(per_token[k] for k in rec if k != "attn")
                                       + (attn if "attn" in rec else 0))
    # The weights read by the forward and the backward pass; with full training also the optimizer's update
    # (parameter, gradient and AdamW's two moments read in float32, parameter and moments written).
    params = sum(math.prod(s) for s in _weight_shapes(c))
    params += 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    out["weight_bytes"] = 2 * weights_param
    out["hbm_bytes"] = 0 if w.frozen_base else 7 * 4 * params
  elif w.kind in ("forward", "prefill"):
    out["flops"] = w.passes * forward
    out["weight_bytes"] = w.passes * weights
    out["hbm_bytes"] = w.rows * w.tokens * kv_row if w.kind == "prefill" else 0
  elif w.kind == "decode":
    out["flops"] = forward
    out["weight_bytes"] = weights
    out["hbm_bytes"] = w.rows * context * kv_row
  elif w.kind != "insert":
    raise ValueError(f"Work.kind {w.kind!r}: expected train, forward, prefill, insert or decode")
  return out


def _dtype_bytes(dtype) -> int:
  import jax.numpy as jnp
  return jnp.dtype(dtype).itemsize


def _weight_shapes(c) -> list[tuple[int, ...]]:
  """Weights one forward pass reads whole (the embedding table only as the tied LM head: a lookup reads rows)."""
  D, N, K, H, F, V = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size)
  layer = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D), (D,), (D,)]
  return layer * c.num_layers + [(V, D), (D,)]


def engine_work(name: str, args: tuple, config, *, context: int, new_tokens: int, calls: float = 1.0) -> Work | None:
  """The Work of an engine program (rrjax.engine.core.abstract_programs: prefill(params, tokens [G, P], ...),
  insert, decode(params, ?, state, ...)) read off its abstract arguments; a decode step attends to `context`
  live keys per slot."""
  del new_tokens
  if name.endswith("prefill"):
    G, P = args[1].shape
    return Work(config, "prefill", G, P, logit_tokens=1, calls=calls)
  if name.endswith("insert"):  # samples first tokens into slots: no matmul, a few small arrays
    return Work(config, "insert", int(args[2].src_n.shape[0]), 0, calls=calls)
  if name.endswith("decode"):
    return Work(config, "decode", int(args[2].lengths_B.shape[0]), 1, context=context, logit_tokens=1, calls=calls)
  return None


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def program_cost(hlo_text: str, work: Work | None, chip: Chip | None, devices: int, tensor: int = 1) -> dict:
  """The `cost` entry of one compiled program (per device: the work split over `devices`, each reading its
  shard of the weights over `tensor`)."""
  live = work.context if work is not None and work.kind == "decode" else None
  counted = count_hlo(hlo_text, live_context=live)
  want = useful(work) if work is not None else {"flops": 0.0, "hbm_bytes": 0.0, "weight_bytes": 0.0,
                                                "remat_flops": 0.0}
  u_flops, remat = want["flops"] / devices, want["remat_flops"] / devices
  u_bytes = want["weight_bytes"] / tensor + want["hbm_bytes"] / devices
  seconds = max(counted.flops / chip.peak_flops, counted.hbm_bytes / chip.hbm_bandwidth) if chip else None
  return {"flops": counted.flops, "hbm_bytes": counted.hbm_bytes, "useful_flops": u_flops, "useful_hbm_bytes": u_bytes,
          "flops_ratio": _ratio(counted.flops, u_flops), "hbm_bytes_ratio": _ratio(counted.hbm_bytes, u_bytes),
          "remat_flops": remat, "roofline_seconds": seconds, "calls": work.calls if work else 1.0,
          "counted": counted_note(counted)}


def _seconds(rep: dict) -> float | None:
  """Roofline seconds of one training step or one rerank: each program's roofline times its calls."""
  costs = [p.get("cost") for p in rep["programs"]]
  if not costs or any(c is None or c["roofline_seconds"] is None for c in costs):
    return None
  return sum(c["roofline_seconds"] * c["calls"] for c in costs)


def training_totals(rep: dict, *, tokens_per_step: int, chip: Chip | None, steps: int | None) -> dict:
  """The report's step_seconds, tokens_per_second, mfu_ceiling, run_hours and chip_hours (None where there is
  no chip, or no run length: num_steps = 0 means epochs of a dataset preflight does not read)."""
  step = _seconds(rep)
  useful_flops = sum(p["cost"]["useful_flops"] * p["cost"]["calls"] for p in rep["programs"] if p.get("cost"))
  hours = steps * step / 3600 if step and steps else None
  return {"step_seconds": step, "tokens_per_second": tokens_per_step / step if step else None,
          "mfu_ceiling": useful_flops / (step * chip.peak_flops) if step and chip else None,
          "run_steps": steps, "run_hours": hours, "chip_hours": hours * rep["devices"] if hours is not None else None}


def rerank_totals(rep: dict, *, windows: int, queries: int) -> dict:
  """The report's window_seconds and queries_per_second for `windows` windows of `queries` queries."""
  total = _seconds(rep)
  return {"window_seconds": total / windows if total else None,
          "queries_per_second": queries / total if total else None}


def table(rep: dict) -> str:
  """The --cost table: per program and device, compiled against useful, and the roofline."""
  head = (f"{'program':<18}{'FLOPs':>9}{'useful':>9}{'ratio':>7}{'remat':>9}{'HBM B':>9}{'useful':>9}{'ratio':>7}"
          f"{'roofline s':>12}{'calls':>9}   counted (per device)")
  lines = [head]
  for p in rep["programs"]:
    c = p.get("cost")
    if c is None:
      lines.append(f"{p['name']:<18}   (not compiled)")
      continue
    ratio = lambda x: f"{x:>7.2f}" if x is not None else f"{'-':>7}"
    seconds = f"{c['roofline_seconds']:>12.3g}" if c["roofline_seconds"] is not None else f"{'-':>12}"
    lines.append(f"{p['name']:<18}{_si(c['flops']):>9}{_si(c['useful_flops']):>9}{ratio(c['flops_ratio'])}"
                 f"{_si(c['remat_flops']):>9}{_si(c['hbm_bytes']):>9}{_si(c['useful_hbm_bytes']):>9}"
                 f"{ratio(c['hbm_bytes_ratio'])}{seconds}{c['calls']:>9.0f}   {c['counted']}")
  chip = rep.get("chip")
  if chip:
    lines.append(f"roofline on {chip['kind']}: {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
                 f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s ({chip['source']})")
  else:
    lines.append("no roofline: no chip kind for these devices (--chip KIND)")
  if "step_seconds" in rep:
    lines.append(_line(rep, ("step_seconds", "s per step", 1, 3), ("tokens_per_second", "tokens/s", 1, 0),
                       ("mfu_ceiling", "MFU ceiling", 1, 3), ("run_hours", "h per run", 1, 2),
                       ("chip_hours", "chip-hours", 1, 1)) + (f" ({rep['run_steps']} steps)" if rep.get("run_steps")
                                                              else " (run length: --steps N)"))
  if "window_seconds" in rep:
    lines.append(_line(rep, ("window_seconds", "s per window", 1, 3), ("queries_per_second", "queries/s", 1, 3)))
  return "\n".join(lines)


def _si(x: float) -> str:
  """1.47e11 -> '147G'."""
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _line(rep, *fields) -> str:
  return "roofline: " + ", ".join(f"{'-' if rep.get(k) is None else f'{rep[k] / s:.{d}f}'} {label}"
                                  for k, label, s, d in fields)
