"""Per-device memory arithmetic behind launch/SCALING.md (python launch/memory.py prints its tables).

Parameter counts come from `Qwen2Config.preset(...).param_count()` (abstract shapes, nothing allocated)
and KV-cache sizes from `KVCache.nbytes`; the rest are the formulas in SCALING.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rrjax.model.qwen2 import KVCache, Qwen2Config  # noqa: E402

GB = 1e9
HBM_GB = {"TPU v5e": 16, "TPU v6e": 32, "TPU v5p": 95, "H100": 80}
SLICES = {"TPU v5e": (8, 16, 32, 64, 128, 256), "TPU v6e": (8, 16, 32, 64, 128, 256),
          "TPU v5p": (4, 8, 16, 32, 64, 128), "H100": (8, 16, 32, 64)}
SEQ = 23552  # ReasonRank SFT cutoff
ROLLOUT_SEQS, ROLLOUT_SLOTS = 16 * 8, 16384  # GRPO: 16 prompts x 8 rollouts; ~11k prompt + 3072 answer
USABLE = 0.9  # leave room for XLA scratch and fragmentation


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  cfg: Qwen2Config
  params: int
  lora: bool  # LoRA r=32: base frozen (no grads, no Adam state); adapters are negligible


def models() -> list[Model]:
  out = []
  for name, lora in (("7b", False), ("32b", True)):
    cfg = Qwen2Config.preset(name)
    out.append(Model(name.upper(), cfg, cfg.param_count(), lora))
  return out


def _divides(n: int, t: int) -> int:
  return t if n % t == 0 else 1


def train_bytes(m: Model, fsdp: int, tensor: int, *, seq: int = SEQ, per_device_seqs: int = 1,
                param_bytes: int = 4) -> dict[str, float]:
  """Per-device bytes of one SFT micro-step: data axis 1, params sharded over fsdp x tensor."""
  c, shards, b = m.cfg, fsdp * tensor, per_device_seqs
  t_mlp, t_heads, t_vocab = _divides(c.intermediate_size, tensor), _divides(c.num_heads, tensor), \
      _divides(c.vocab_size, tensor)
  act = 2  # bf16 activations
  out = {"params": m.params * param_bytes / shards}
  if m.lora:
    out["grads"] = out["adam"] = 0.0
  else:
    out["grads"] = m.params * param_bytes / shards
    out["adam"] = m.params * 2 * 4 / shards  # f32 m and v
  # remat: only each layer's input is kept for the backward pass (the scan carry).
  out["saved acts"] = c.num_layers * b * seq * c.hidden_size * act
  # One layer recomputed plus its gradients: norms/residuals (4D), q,k,v,o, gate/up/act (3F); x2 for grads.
  qkvo = (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim / t_heads
  out["layer work"] = 2 * b * seq * (4 * c.hidden_size + qkvo + 3 * c.intermediate_size / t_mlp) * act
  # bf16 logits, f32 log-softmax and f32 gradient over the whole vocabulary (vocab is on the tensor axis).
  out["logits"] = b * seq * c.vocab_size / t_vocab * (2 + 4 + 4)
  out["total"] = sum(out.values())
  return out


def rollout_kv_bytes(m: Model, shards_batch: int, tensor: int) -> float:
  per = KVCache.nbytes(m.cfg, ROLLOUT_SEQS, ROLLOUT_SLOTS, "bfloat16")
  return per / (shards_batch * _divides(m.cfg.num_kv_heads, tensor))


def smallest_fit(m: Model, chip: str) -> tuple[int, int, int, dict] | None:
  """(chips, fsdp, tensor, bytes): the smallest slice that fits, with the least tensor parallelism that
  fits there (more fsdp = more sequences per step and less per-layer communication)."""
  for n in SLICES[chip]:
    for tensor in (1, 2, 4, 8):
      if n % tensor:
        continue
      mem = train_bytes(m, n // tensor, tensor)
      if mem["total"] <= USABLE * HBM_GB[chip] * GB:
        return n, n // tensor, tensor, mem
  return None


def main() -> None:
  ms = models()
  print("| model | parameters | params f32 | + grads f32 | + AdamW m, v f32 | KV cache / token (bf16) |")
  print("|---|---|---|---|---|---|")
  for m in ms:
    p = m.params
    kv = KVCache.nbytes(m.cfg, 1, 1, "bfloat16")
    print(f"| {m.name} | {p / 1e9:.2f} B | {4 * p / GB:.0f} GB | {4 * p / GB:.0f} GB | {8 * p / GB:.0f} GB | "
          f"{kv / 1024:.0f} KiB |")
  print()
  print(f"Per device, one {SEQ}-token sequence per device, remat on (GB):")
  print()
  print("| model | hardware | chips | mesh (data, fsdp, tensor) | params | grads | AdamW | saved acts | "
        "layer work | logits | total | HBM |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for m in ms:
    for chip in HBM_GB:
      fit = smallest_fit(m, chip)
      if fit is None:
        print(f"| {m.name}{' LoRA' if m.lora else ''} | {chip} | none up to {SLICES[chip][-1]} | - | | | | | | | | "
              f"{HBM_GB[chip]} |")
        continue
      n, fsdp, tensor, mem = fit
      cells = " | ".join(f"{mem[k] / GB:.1f}" for k in
                         ("params", "grads", "adam", "saved acts", "layer work", "logits", "total"))
      print(f"| {m.name}{' LoRA' if m.lora else ''} | {chip} | {n} | (1, {fsdp}, {tensor}) | {cells} | "
            f"{HBM_GB[chip]} |")
  print()
  print(f"GRPO rollouts: KV cache of {ROLLOUT_SEQS} sequences x {ROLLOUT_SLOTS} slots (bf16):")
  print()
  print("| model | total | per device, 8 chips (fsdp 8) | per device, 16 chips (fsdp 4, tensor 4) |")
  print("|---|---|---|---|")
  for m in ms:
    total = KVCache.nbytes(m.cfg, ROLLOUT_SEQS, ROLLOUT_SLOTS, "bfloat16")
    print(f"| {m.name} | {total / GB:.0f} GB | {rollout_kv_bytes(m, 8, 1) / GB:.1f} GB | "
          f"{rollout_kv_bytes(m, 4, 4) / GB:.1f} GB |")


if __name__ == "__main__":
  main()
