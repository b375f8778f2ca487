"""Qwen2 / Qwen2.5 and Qwen3 decoders in Flax NNX: one architecture whose differences are settings.

Qwen3 (transformers' modeling_qwen3.py) is Qwen2 with an RMSNorm over head_dim on each query and key head
(after the head reshape, before RoPE), no q/k/v bias, and head_dim given in config.json rather than
hidden_size / num_heads (so attention width may differ from hidden_size): `qk_norm`, `attention_bias` and
`head_dim` of Qwen2Config.

Layers are stored stacked (leading `layers` axis) and applied with `jax.lax.scan` (or a Python loop), with
an optional remat policy. Every parameter carries logical axis names (`logical_axes` metadata) that
rrjax.sharding maps onto a mesh. Shapes: B batch, T query length, S key length (cache), D hidden,
N query heads, K kv heads, G = N // K, H head dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rrjax import sharding
from rrjax.model import attention as attention_lib
from rrjax.model import lora as lora_lib
from rrjax.model.lora import LoraConfig

_CONFIGS = Path(__file__).parent.parent / "assets" / "qwen2.5_instruct_configs.json"
# The official Qwen3 dense config.json files, verbatim (see assets/PROVENANCE.md).
_QWEN3_CONFIGS = Path(__file__).parent.parent / "assets" / "qwen3-configs"
QWEN3_SIZES = {"0_6b": "Qwen3-0.6B", "1_7b": "Qwen3-1.7B", "4b": "Qwen3-4B", "8b": "Qwen3-8B", "14b": "Qwen3-14B",
               "32b": "Qwen3-32B"}
# model_type -> (architecture, transformers' head_dim default: None is hidden_size // num_attention_heads,
# sliding_window default where config.json names none).
_FAMILIES = {"qwen2": ("Qwen2ForCausalLM", None, None), "qwen3": ("Qwen3ForCausalLM", 128, 4096)}

# What each decoder layer keeps for the backward pass (the rest is recomputed there). Every policy keeps the
# layer's input (the scan carry); at 23,552 tokens that alone is 2 L T D bytes in bf16.
REMAT_POLICIES = {
    "none": None,  # everything: fastest, by far the most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # the layer input only: what long sequences need
    # the q/k/v projections (named below): skips recomputing three matmuls, + (N + 2K) H T bytes per layer
    "qkv": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
    # the q/k/v projections and the attention output (the o-projection's input)
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj", "attn_out"),
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output, attention scores included
    # every projection output (q, k, v, o, gate, up, down), not only the layer input
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The run-time policy fields of Qwen2Config (everything else is architecture).
POLICY_FIELDS = ("param_dtype", "dtype", "attention", "scan_layers", "remat")


_REQUIRED = object()
# transformers' Qwen2 default (4.x and 5.x) for a config.json that names no rope_theta anywhere.
_HF_DEFAULT_ROPE_THETA = 10_000.0


def _hf_field(d: dict, source: str, key: str, kind: type, *, positive: bool = False, default: Any = _REQUIRED):
  """d[key] checked to be a `kind` (int, float or bool); missing or null takes `default`."""
  value = d.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"{source}: {key}: is null" if key in d else f"{source}: missing field {key!r}")
    return default
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:  # JSON writers may print integral numbers as 32.0
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
  else:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
  if not ok or (positive and value <= 0):
    what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    raise ValueError(f"{source}: {key}: expected {'a positive integer' if positive else what}, got {value!r}")
  return kind(value)


def _hf_token_id(d: dict, key: str, source: str) -> int | None:
  """A token id that may be missing, null, an int or a list of ints (then its first, as generation does)."""
  value = d.get(key)
  ids = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
    raise ValueError(f"{source}: {key}: expected a token id, a list of them or null, got {value!r}")
  return ids[0] if ids else None


def _hf_rope_theta(d: dict, source: str) -> float:
  """rope_theta from 5.x's `rope_parameters` or 4.x's top level; only the default (unscaled) rope runs here."""
  # transformers 5 gives a non-empty legacy `rope_scaling` precedence over `rope_parameters`.
  field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
  params = d.get(field) or {}
  if not isinstance(params, dict):
    raise ValueError(f"{source}: {field}: expected an object or null, got {params!r}")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", None):
    raise ValueError(f"{source}: {field}: rope type {kind!r} is not supported (rrjax implements the default "
                     "unscaled rotary embedding only)")
  theta = params.get("rope_theta", d.get("rope_theta"))
  if theta is None:
    return _HF_DEFAULT_ROPE_THETA
  return _hf_field({"rope_theta": theta}, source, "rope_theta", float)


def _check_full_attention(d: dict, source: str, num_layers: int, max_positions: int,
                          default_window: int | None = None) -> None:
  """Refuses sliding-window attention where transformers' Qwen2 would apply it: a window only exists with
  use_sliding_window true, on the layers that layer_types (or, without it, max_window_layers) marks sliding,
  and only changes attention when it is shorter than max_position_embeddings."""
  f = functools.partial(_hf_field, d, source)
  types = d.get("layer_types")
  if types is not None:
    if not isinstance(types, list) or len(types) != num_layers:
      raise ValueError(f"{source}: layer_types: expected a list of {num_layers} layer types, got {types!r}")
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise ValueError(f"{source}: layer_types: {unknown[0]!r} is not an attention type rrjax implements")
  if not f("use_sliding_window", bool, default=False):
    return
  window = f("sliding_window", int, positive=True, default=default_window)
  if window is None:
    return
  if types is None:
    first = f("max_window_layers", int, default=28)  # transformers' default
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
  sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
  if sliding and window < max_positions:
    raise ValueError(f"{source}: use_sliding_window: true with sliding_window={window} < max_position_embeddings="
                     f"{max_positions} restricts {len(sliding)} of {num_layers} layers (from layer {sliding[0]}) "
                     "to a window; rrjax implements full causal attention only")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Architecture plus run-time policy (dtypes, attention kernel, scan, remat)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  tie_word_embeddings: bool
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  # Qwen2.5's ids by default; None where a checkpoint's config.json has none (kept so through an export).
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  name: str = "qwen2"
  # Qwen3: q and k RMS-normalised over head_dim per head, before RoPE (weights [head_dim], eps rms_norm_eps).
  qk_norm: bool = False
  # Bias on q/k/v (Qwen2 always; Qwen3's attention_bias, false in every released size, would bias o too).
  attention_bias: bool = True
  # Policy, not architecture.
  param_dtype: str = "float32"
  dtype: str = "float32"
  attention: str = "auto"  # auto (the platform's fused kernel where it applies) | xla | cudnn | splash
  scan_layers: bool = True
  remat: str = "none"  # a REMAT_POLICIES name: none | full | qkv | qkv_attn | dots | dots_no_batch
  lora: LoraConfig = LoraConfig()  # adapters (rank 0: none)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention={self.attention!r}; choose one of {attention_lib.IMPLEMENTATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    # Every config is one transformers architecture, so that it exports: Qwen2 (q/k/v bias, no q/k norm) or
    # Qwen3 without attention bias (its attention_bias: true also biases o_proj, which rrjax does not have).
    if self.qk_norm == self.attention_bias:
      raise ValueError(f"qk_norm={self.qk_norm} with attention_bias={self.attention_bias} is neither Qwen2 "
                       "(attention_bias, no qk_norm) nor Qwen3 (qk_norm, no attention_bias)")

  @property
  def model_type(self) -> str:
    """The transformers model_type: "qwen3" with q/k norms, else "qwen2"."""
    return "qwen3" if self.qk_norm else "qwen2"

  def replace(self, **kwargs) -> Qwen2Config:
    return dataclasses.replace(self, **kwargs)

  def policy(self) -> dict[str, Any]:
    """The dtype/kernel/scan/remat settings, to carry onto another checkpoint's architecture."""
    return {f: getattr(self, f) for f in POLICY_FIELDS}

  # ---- presets (Instruct values; see assets/qwen2.5_instruct_configs.json) ----

  @classmethod
  def _preset(cls, key: str, **overrides) -> Qwen2Config:
    models = json.loads(_CONFIGS.read_text())["models"]
    return cls.from_hf_dict({**json.loads(_CONFIGS.read_text())["common"], **models[key]}, name=key,
                            **overrides)

  @classmethod
  def qwen2_5_0_5b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-0.5B-Instruct", **kw)

  @classmethod
  def qwen2_5_1_5b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-1.5B-Instruct", **kw)

  @classmethod
  def qwen2_5_3b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-3B-Instruct", **kw)

  @classmethod
  def qwen2_5_7b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-7B-Instruct", **kw)

  @classmethod
  def qwen2_5_14b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-14B-Instruct", **kw)

  @classmethod
  def qwen2_5_32b(cls, **kw) -> Qwen2Config:
    return cls._preset("Qwen2.5-32B-Instruct", **kw)

  @classmethod
  def qwen2_5_72b(cls, **kw) -> Qwen2Config:
    # Published Qwen2.5-72B-Instruct config.json values.
    return cls(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
               num_kv_heads=8, head_dim=128, tie_word_embeddings=False, name="Qwen2.5-72B-Instruct", **kw)

  @classmethod
  def _qwen3(cls, size: str, **overrides) -> Qwen2Config:
    name = QWEN3_SIZES[size]
    return cls.from_hf_dict(json.loads((_QWEN3_CONFIGS / name / "config.json").read_text()), name=name, **overrides)

  @classmethod
  def qwen3_0_6b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("0_6b", **kw)

  @classmethod
  def qwen3_1_7b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("1_7b", **kw)

  @classmethod
  def qwen3_4b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("4b", **kw)

  @classmethod
  def qwen3_8b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("8b", **kw)

  @classmethod
  def qwen3_14b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("14b", **kw)

  @classmethod
  def qwen3_32b(cls, **kw) -> Qwen2Config:
    return cls._qwen3("32b", **kw)

  @classmethod
  def tiny(cls, **kw) -> Qwen2Config:
    """A 2-layer model with the Qwen2.5 vocabulary, small enough for CPU tests and the demo."""
    defaults = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, tie_word_embeddings=True, name="tiny")
    return cls(**{**defaults, **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> Qwen2Config:
    """A preset by name: "0.5b", "qwen2_5_7b", "Qwen2.5-7B-Instruct", "qwen3_8b", "Qwen3-0.6B", "tiny"
    (a bare size is Qwen2.5's)."""
    key = name.lower().replace("-instruct", "").replace(".", "_").replace("-", "_")
    family = "qwen3" if key.startswith("qwen3_") else "qwen2_5"
    key = key.removeprefix("qwen3_").removeprefix("qwen2_5_")
    ctor = getattr(cls, "tiny" if key == "tiny" else f"{family}_{key}", None)
    if ctor is None:
      raise ValueError(f"unknown model preset {name!r}")
    return ctor(**kw)

  # ---- Hugging Face config.json ----

  _HF_FIELDS = {
      "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
      "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
      "num_kv_heads": "num_key_value_heads",
  }

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json", name: str | None = None,
                   **overrides) -> Qwen2Config:
    """The architecture of a Qwen2 or Qwen3 config.json (by its model_type) as transformers 4.x or 5.x writes
    it, with transformers' defaults for what it leaves out. Errors are ValueErrors of one line,
    `<source>: <field>: <reason>`; what rrjax cannot run the same way (sliding-window layers, scaled rope,
    Qwen3's attention bias) is refused rather than silently changed."""
    if not isinstance(d, dict):
      raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "qwen2")
    arch, default_head_dim, default_window = _FAMILIES.get(model_type, (None, None, None))
    archs = d.get("architectures") or [arch]
    if arch is None or arch not in archs:
      raise ValueError(f"{source}: architecture {archs} / model_type {model_type!r} is not Qwen2ForCausalLM "
                       "(model_type qwen2) or Qwen3ForCausalLM (model_type qwen3)")
    for hf in cls._HF_FIELDS.values():
      if hf not in d:
        raise ValueError(f"{source}: missing field {hf!r}")
    f = functools.partial(_hf_field, d, source)
    kw = {ours: f(hf, int, positive=True, default=None if hf == "num_key_value_heads" else _REQUIRED)
          for ours, hf in cls._HF_FIELDS.items()}
    if kw["num_kv_heads"] is None:  # transformers reads a null as one kv head per query head
      kw["num_kv_heads"] = kw["num_heads"]
    if (act := d.get("hidden_act", "silu")) != "silu":
      raise ValueError(f"{source}: hidden_act: {act!r} is not supported (rrjax's MLP is SiLU-gated)")
    qwen3 = model_type == "qwen3"
    if qwen3 and f("attention_bias", bool, default=False):
      raise ValueError(f"{source}: attention_bias: true is not supported for Qwen3 (rrjax has no o_proj bias)")
    kw.update(
        head_dim=f("head_dim", int, positive=True, default=default_head_dim or kw["hidden_size"] // kw["num_heads"]),
        qk_norm=qwen3, attention_bias=not qwen3,
        tie_word_embeddings=f("tie_word_embeddings", bool, default=False),
        rope_theta=_hf_rope_theta(d, source),
        rms_norm_eps=f("rms_norm_eps", float, default=1e-6),
        max_position_embeddings=f("max_position_embeddings", int, positive=True, default=32768),
        bos_token_id=_hf_token_id(d, "bos_token_id", source),
        eos_token_id=_hf_token_id(d, "eos_token_id", source),
        name=name or d.get("_name_or_path") or model_type,
    )
    _check_full_attention(d, source, kw["num_layers"], kw["max_position_embeddings"], default_window)
    try:
      return cls(**{**kw, **overrides})
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
    qwen3 = {"attention_bias": False} if self.qk_norm else {}
    return {
        "architectures": [_FAMILIES[self.model_type][0]], "model_type": self.model_type, **qwen3, "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "tie_word_embeddings": self.tie_word_embeddings,
        "rope_theta": self.rope_theta, "rope_scaling": None, "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": self.num_layers, "use_cache": True,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": torch_dtype,
    }

  def forward_flops(self, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass over [batch, seq] (embedding lookup free; full T x T scores)."""
    D, N, K, H, F, L = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.intermediate_size, self.num_layers)
    per_token = L * 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 2 * D * self.vocab_size
    return float(per_token * batch * seq + L * 2 * 2 * seq * seq * N * H * batch)

  def param_count(self) -> int:
    """Number of parameters, from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Qwen2(self, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


class KVCache(NamedTuple):
  """Per-layer keys/values for `S` slots. Slots [0, index) are written; `segment_BxS` is 0 for empty or
  padding slots (never attended to)."""

  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  segment_BxS: jax.Array
  index: jax.Array  # int32 scalar: the next slot to write

  @classmethod
  def zeros(cls, config: Qwen2Config, batch: int, length: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), jnp.int32),
               jnp.zeros((), jnp.int32))

  @staticmethod
  def logical_axes():
    kv = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return KVCache(kv, kv, ("batch", "cache_length"), ())

  @staticmethod
  def nbytes(config: Qwen2Config, batch: int, length: int, dtype=None) -> int:
    item = jnp.dtype(dtype or config.dtype).itemsize
    return 2 * config.num_layers * batch * length * config.num_kv_heads * config.head_dim * item


class SlotCache(NamedTuple):
  """Keys/values of B decode slots of S positions, filled from position 0 (right padding): slot b's keys
  are positions [0, length_b), the lengths kept by whoever owns the cache; what lies beyond is never read.
  Layout "split": k and v [L, B, S, K, H]; "paged" (the TPU ragged paged kernel's): k holds keys and values
  interleaved per kv head, [L, B, S, 2K, H], and v is None."""

  k: jax.Array
  v: jax.Array | None

  @classmethod
  def zeros(cls, config: Qwen2Config, slots: int, length: int, dtype=None, layout: str = "split") -> SlotCache:
    dtype = jnp.dtype(dtype or config.dtype)
    L, K, H = config.num_layers, config.num_kv_heads, config.head_dim
    if layout == "paged":
      return cls(jnp.zeros((L, slots, length, 2 * K, H), dtype), None)
    return cls(jnp.zeros((L, slots, length, K, H), dtype), jnp.zeros((L, slots, length, K, H), dtype))

  @property
  def layout(self) -> str:
    return "paged" if self.v is None else "split"

  @staticmethod
  def logical_axes(layout: str = "split") -> SlotCache:
    kv = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return SlotCache(kv, None if layout == "paged" else kv)


def _param(rngs, shape, axes, dtype, init="normal"):
  if init == "normal":
    value = nnx.initializers.normal(0.02)(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=axes)


class DecoderLayers(nnx.Module):
  """All decoder layers' weights, stacked on a leading `layers` axis."""

  def __init__(self, c: Qwen2Config, *, rngs: nnx.Rngs):
    L, D, N, K, H, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    pd = jnp.dtype(c.param_dtype)
    self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), pd, "ones")
    self.q_kernel = _param(rngs, (L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), pd)
    self.k_kernel = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
    self.v_kernel = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
    if c.attention_bias:
      self.q_bias = _param(rngs, (L, N, H), ("layers", "q_heads", "head_dim"), pd, "zeros")
      self.k_bias = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
      self.v_bias = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
    if c.qk_norm:
      self.q_norm = _param(rngs, (L, H), ("layers", "head_dim"), pd, "ones")
      self.k_norm = _param(rngs, (L, H), ("layers", "head_dim"), pd, "ones")
    self.o_kernel = _param(rngs, (L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), pd)
    self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), pd, "ones")
    self.gate_kernel = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
    self.up_kernel = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
    self.down_kernel = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), pd)
    lora_lib.add_adapters(self, c.lora, rngs)

  def weights(self) -> dict[str, jax.Array]:
    return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


def _biased(spec, x, kernel, bias, dtype):
  """x @ kernel + bias rounded to `dtype` once, as a fused linear layer (torch's addmm) does; no bias: x @ kernel."""
  if bias is None:
    return jnp.einsum(spec, x, kernel.astype(dtype))
  y = jnp.einsum(spec, x, kernel.astype(dtype), preferred_element_type=jnp.float32)
  return (y + bias.astype(dtype).astype(jnp.float32)).astype(dtype)


def rms_norm(x_BxTxD, weight_D, eps):
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return weight_D.astype(x_BxTxD.dtype) * x.astype(x_BxTxD.dtype)


def rope_tables(positions_BxT, head_dim, theta):
  """cos/sin tables [B, T, H] for half-split rotary embeddings (float32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
  return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  cos, sin = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype), sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  return x_BxTxNxH * cos + rotated * sin


def positions_from_segments(segment_ids_BxT):
  """Position of each token inside its packed segment (restarts at 0 where the segment id changes)."""
  T = segment_ids_BxT.shape[1]
  idx_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BxT.shape)
  change_BxT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_BxT = jax.lax.cummax(jnp.where(change_BxT, idx_BxT, 0), axis=1)
  return idx_BxT - start_BxT


class Qwen2(nnx.Module):
  """Qwen2ForCausalLM. `model(tokens, positions, segment_ids)` -> float32 logits [B, T, V]."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    pd = jnp.dtype(c.param_dtype)
    self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd)
    self.layers = DecoderLayers(c, rngs=rngs)
    self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), pd, "ones")
    if not c.tie_word_embeddings:
      self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pd)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, *, cache: KVCache | None = None,
               fresh_cache: bool = False):
    """Logits for `tokens`. Without a cache, attention is causal inside each segment (segment id 0 marks
    padding). With a cache, the new keys/values are written at `cache.index` and `(logits, cache)` is
    returned; then `positions` are required and `segment_ids` default to ones. `fresh_cache=True` (static)
    promises an empty cache, so the new tokens attend only to each other through the fused kernels
    (splash/cudnn) instead of a dense mask over every cache slot."""
    hidden_BxTxD, cache = self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT, cache=cache,
                                             fresh_cache=fresh_cache)
    logits = self.logits(hidden_BxTxD)
    return logits if cache is None else (logits, cache)

  def logits(self, hidden_BxTxD):
    c = self.config
    if c.tie_word_embeddings:  # contract against the table as stored: no transposed copy of V x D
      logits_BxTxV = jnp.einsum("btd,vd->btv", hidden_BxTxD, self.embed[...].astype(c.dtype),
                                preferred_element_type=jnp.float32)
    else:
      logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, self.lm_head[...].astype(c.dtype),
                                preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BxTxV, ("batch", "length", "vocab"))

  def hidden_states(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, *, cache=None,
                    fresh_cache: bool = False, lengths_B=None):
    """Final-norm hidden states [B, T, D] (and the updated cache, or None). `lengths_B` promises right
    padding (segment 1 on [0, length), 0 after), which lets cuDNN skip the padding without a dense mask."""
    c = self.config
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
    if positions_BxT is None:
      if cache is not None:
        raise ValueError("positions are required when decoding with a cache")
      positions_BxT = positions_from_segments(segment_ids_BxT)

    self_only = cache is None or fresh_cache  # keys are exactly this call's tokens
    if cache is not None:
      cache_segment_BxS = jax.lax.dynamic_update_slice(cache.segment_BxS, segment_ids_BxT, (0, cache.index))
    if self_only:
      q_index_T = kv_index_S = jnp.arange(T, dtype=jnp.int32)
      mask = attention_lib.Mask(segment_ids_BxT, segment_ids_BxT, q_index_T, kv_index_S, causal_only=True,
                                lengths_B=lengths_B)
    else:
      q_index_T = cache.index + jnp.arange(T, dtype=jnp.int32)
      kv_index_S = jnp.arange(cache.segment_BxS.shape[1], dtype=jnp.int32)
      mask = attention_lib.Mask(segment_ids_BxT, cache_segment_BxS, q_index_T, kv_index_S, causal_only=False)

    def attend(q, k, v, k_cache, v_cache, index):
      if k_cache is not None:
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (index, 0, cache.index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (index, 0, cache.index, 0, 0))
        if not self_only:
          k = jax.lax.dynamic_index_in_dim(k_cache, index, 0, keepdims=False).astype(c.dtype)
          v = jax.lax.dynamic_index_in_dim(v_cache, index, 0, keepdims=False).astype(c.dtype)
      return attention_lib.attend(q, k, v, mask, impl=c.attention), k_cache, v_cache

    kv = (None, None) if cache is None else (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH)
    hidden, (k_cache, v_cache) = self._decoder(tokens_BxT, positions_BxT, kv, attend)
    if cache is not None:
      cache = KVCache(k_cache, v_cache, cache_segment_BxS, cache.index + T)
    return hidden, cache

  def extend(self, tokens_BxT, cache: SlotCache, lengths_B, *, kernel: str = "xla", keys: int | None = None):
    """Appends T tokens to every row of a right-padded slot cache: row b's tokens take positions (RoPE
    and cache slots alike) lengths_B[b] + [0, T) and attend to the row's keys up to their own position.
    Returns (final-norm hidden states [B, T, D], the updated cache). Writes past the cache's end are
    dropped; what lies past a row's length is never read. `kernel`: see attention.slot_kernel; `keys`: a
    static bound on every row's length + T, the cache positions attention reads (XLA)."""
    B, T = tokens_BxT.shape
    lengths_B = lengths_B.astype(jnp.int32)
    positions_BxT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    rows_Bx1 = jnp.arange(B, dtype=jnp.int32)[:, None]

    def attend(q, k, v, k_cache, v_cache, index):
      if v_cache is None:  # paged: (k, v) interleaved per kv head
        kv = jnp.stack([k, v], axis=-2).reshape(*k.shape[:2], 2 * k.shape[2], k.shape[3])
        k_cache = k_cache.at[index, rows_Bx1, positions_BxT].set(kv.astype(k_cache.dtype), mode="drop")
      else:
        k_cache = k_cache.at[index, rows_Bx1, positions_BxT].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[index, rows_Bx1, positions_BxT].set(v.astype(v_cache.dtype), mode="drop")
      out = attention_lib.attend_slots(q, k_cache, v_cache, index, lengths_B + T, kernel=kernel, keys=keys)
      return out, k_cache, v_cache

    hidden, (k_cache, v_cache) = self._decoder(tokens_BxT, positions_BxT, (cache.k, cache.v), attend)
    return hidden, SlotCache(k_cache, v_cache)

  def _decoder(self, tokens_BxT, positions_BxT, kv, attend):
    """Embedding, the decoder layers and the final norm; `attend(q, k, v, k_cache, v_cache, layer)` is the
    attention (and cache update) of one layer. Returns (hidden [B, T, D], (k_cache, v_cache))."""
    c = self.config
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(c.dtype)
    x_BxTxD = sharding.constrain(x_BxTxD, ("batch", "length", "embed"))
    cos, sin = rope_tables(positions_BxT, c.head_dim, c.rope_theta)

    def layer(carry, xs):
      x_BxTxD, k_cache, v_cache = carry
      w, index = xs

      def adapted(out, inp, target):  # out + the target's LoRA delta, when it has an adapter
        d = lora_lib.delta(inp, target, w, c.lora, c.dtype)
        return out if d is None else out + d

      h = rms_norm(x_BxTxD, w["attn_norm"], c.rms_norm_eps)
      q = _biased("btd,dnh->btnh", h, w["q_kernel"], w.get("q_bias"), c.dtype)
      k = _biased("btd,dkh->btkh", h, w["k_kernel"], w.get("k_bias"), c.dtype)
      v = _biased("btd,dkh->btkh", h, w["v_kernel"], w.get("v_bias"), c.dtype)
      q, k, v = adapted(q, h, "q"), adapted(k, h, "k"), adapted(v, h, "v")
      q, k, v = checkpoint_name(q, "q_proj"), checkpoint_name(k, "k_proj"), checkpoint_name(v, "v_proj")
      if c.qk_norm:  # Qwen3: per head over head_dim, on the projections (LoRA deltas included), before RoPE
        q, k = rms_norm(q, w["q_norm"], c.rms_norm_eps), rms_norm(k, w["k_norm"], c.rms_norm_eps)
      q = sharding.constrain(apply_rope(q, cos, sin), ("batch", "length", "q_heads", "head_dim"))
      k = sharding.constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
      out_BxTxNxH, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, index)
      out_BxTxNxH = checkpoint_name(out_BxTxNxH, "attn_out")
      attn_BxTxD = adapted(jnp.einsum("btnh,nhd->btd", out_BxTxNxH, w["o_kernel"].astype(c.dtype)), out_BxTxNxH, "o")
      x_BxTxD = x_BxTxD + attn_BxTxD
      h = rms_norm(x_BxTxD, w["mlp_norm"], c.rms_norm_eps)
      gate = jnp.einsum("btd,df->btf", h, w["gate_kernel"].astype(c.dtype))
      up = jnp.einsum("btd,df->btf", h, w["up_kernel"].astype(c.dtype))
      gate, up = adapted(gate, h, "gate"), adapted(up, h, "up")
      # SiLU in float32, rounded once (torch's silu does too): x * sigmoid(x) in bf16 rounds twice.
      act_BxTxF = jax.nn.silu(gate.astype(jnp.float32)).astype(c.dtype) * up
      act_BxTxF = sharding.constrain(act_BxTxF, ("batch", "length", "mlp"))
      mlp_BxTxD = adapted(jnp.einsum("btf,fd->btd", act_BxTxF, w["down_kernel"].astype(c.dtype)), act_BxTxF, "down")
      x_BxTxD = x_BxTxD + mlp_BxTxD
      x_BxTxD = sharding.constrain(x_BxTxD, ("batch", "length", "embed"))
      return (x_BxTxD, k_cache, v_cache), None

    if c.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    weights = self.layers.weights()
    carry = (x_BxTxD, *kv)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    if c.scan_layers:
      carry, _ = jax.lax.scan(layer, carry, (weights, layer_ids))
    else:
      for i in range(c.num_layers):
        carry, _ = layer(carry, (jax.tree.map(lambda w: w[i], weights), layer_ids[i]))
    x_BxTxD, k_cache, v_cache = carry
    return rms_norm(x_BxTxD, self.final_norm[...], c.rms_norm_eps), (k_cache, v_cache)
