"""Qwen2 in NNX against transformers' Qwen2ForCausalLM (torch, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_reference
from rrjax.model.qwen2 import KVCache, Qwen2, Qwen2Config, positions_from_segments

TOL = 1e-4


def _tiny(**kw):
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=12, tie_word_embeddings=False)
  return Qwen2Config(**{**base, **kw})


@pytest.mark.parametrize("config", [
    _tiny(tie_word_embeddings=True),
    _tiny(num_heads=6, num_kv_heads=1),  # MQA
    _tiny(num_heads=4, num_kv_heads=4),  # MHA
    _tiny(num_heads=8, num_kv_heads=2, head_dim=8, num_layers=3, rope_theta=10_000.0, rms_norm_eps=1e-5),
], ids=["tied", "mqa", "mha", "gqa4-3layers"])
@pytest.mark.parametrize("length", [1, 7, 13])
def test_logits_match_transformers(config, length):
  ref = hf_reference.torch_model(config)
  ours = hf_reference.rrjax_twin(ref, config)
  tokens = np.random.default_rng(length).integers(0, config.vocab_size, (3, length))
  expected = hf_reference.torch_logits(ref, tokens)
  got = np.asarray(ours(jnp.asarray(tokens)))
  assert got.dtype == np.float32 and got.shape == (3, length, config.vocab_size)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "none"), (True, "full"), (True, "dots")])
def test_left_padding_with_positions(scan_layers, remat):
  config = _tiny(scan_layers=scan_layers, remat=remat)
  ref = hf_reference.torch_model(config, seed=1)
  ours = hf_reference.rrjax_twin(ref, config)
  rng = np.random.default_rng(0)
  lengths = [9, 4, 1]
  T = max(lengths)
  tokens = np.zeros((3, T), np.int64)
  mask = np.zeros((3, T), np.int64)
  for b, n in enumerate(lengths):
    tokens[b, T - n:] = rng.integers(0, config.vocab_size, n)
    mask[b, T - n:] = 1
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  got = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
  for b, n in enumerate(lengths):  # each row alone, unpadded, is the reference
    expected = hf_reference.torch_logits(ref, tokens[b:b + 1, T - n:])[0]
    np.testing.assert_allclose(got[b, T - n:], expected, atol=TOL, rtol=0)
  expected_padded = hf_reference.torch_logits(ref, tokens, attention_mask=mask, position_ids=positions)
  np.testing.assert_allclose(got * mask[..., None], expected_padded * mask[..., None], atol=TOL, rtol=0)


def test_packed_segments_equal_separate_sequences():
  config = _tiny()
  ref = hf_reference.torch_model(config, seed=2)
  ours = hf_reference.rrjax_twin(ref, config)
  rng = np.random.default_rng(1)
  parts = [5, 3, 6]  # three documents packed into one row of 16, the last 2 slots padding
  tokens = np.zeros((1, 16), np.int64)
  segments = np.zeros((1, 16), np.int64)
  start = 0
  for s, n in enumerate(parts):
    tokens[0, start:start + n] = rng.integers(0, config.vocab_size, n)
    segments[0, start:start + n] = s + 1
    start += n
  got = np.asarray(ours(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(segments)))
  start = 0
  for n in parts:
    expected = hf_reference.torch_logits(ref, tokens[:, start:start + n])
    np.testing.assert_allclose(got[:, start:start + n], expected, atol=TOL, rtol=0)
    start += n


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_causal_through_gradients():
  """d logits[t] / d embedding of token s is zero for s > t and non-zero for s <= t (untied head)."""
  config = _tiny()
  graphdef, embed, rest = nnx.split(Qwen2(config, rngs=nnx.Rngs(0)), nnx.PathContains("embed"), ...)
  tokens = jnp.arange(6)[None]  # distinct ids: row s of the table is the input at position s

  def logit_sum(table, t):
    model = nnx.merge(graphdef, jax.tree.map(lambda _: table, embed), rest)
    return model(tokens)[0, t].sum()

  for t in (0, 3):
    g = jax.grad(logit_sum)(embed["embed"][...], t)
    norms = np.asarray(jnp.abs(g[:6]).sum(-1))
    assert np.all(norms[t + 1:] == 0), norms
    assert np.all(norms[:t + 1] > 0), norms


def test_cache_prefill_then_decode_matches_full_forward():
  config = _tiny()
  model = Qwen2(config, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab_size)
  full = model(tokens)
  cache = KVCache.zeros(config, batch=2, length=16)
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  logits, cache = model(tokens[:, :6], positions[:, :6], cache=cache)
  np.testing.assert_allclose(logits, full[:, :6], atol=TOL)
  for t in range(6, 9):
    logits, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=TOL)
  assert int(cache.index) == 9
  # A fresh-cache prefill (self-attention only, fused-kernel friendly) gives the same logits and cache.
  empty = KVCache.zeros(config, batch=2, length=16)
  dense_logits, dense_cache = model(tokens[:, :6], positions[:, :6], cache=empty)
  fresh_logits, fresh_cache = model(tokens[:, :6], positions[:, :6], cache=empty, fresh_cache=True)
  np.testing.assert_allclose(fresh_logits, dense_logits, atol=1e-6)
  for a, b in zip(jax.tree.leaves(fresh_cache), jax.tree.leaves(dense_cache)):
    np.testing.assert_allclose(a, b, atol=1e-6)


PRESET_COUNTS = {"qwen2_5_0_5b": 0.494, "qwen2_5_1_5b": 1.544, "qwen2_5_3b": 3.086, "qwen2_5_7b": 7.616,
                 "qwen2_5_14b": 14.77, "qwen2_5_32b": 32.76, "qwen2_5_72b": 72.71}


@pytest.mark.parametrize("preset", sorted(PRESET_COUNTS))
def test_preset_parameter_counts(preset):
  config = getattr(Qwen2Config, preset)()
  digits = len(str(PRESET_COUNTS[preset]).split(".")[1])
  assert round(config.param_count() / 1e9, digits) == PRESET_COUNTS[preset]


def test_presets_match_shared_configs():
  c = Qwen2Config.qwen2_5_7b()
  assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.vocab_size, c.tie_word_embeddings) == (3584, 18944, 28, 28, 4, 128, 152064, False)
  assert Qwen2Config.qwen2_5_0_5b().tie_word_embeddings
  assert Qwen2Config.preset("Qwen2.5-1.5B-Instruct") == Qwen2Config.qwen2_5_1_5b()
  assert Qwen2Config.preset("tiny").num_layers == 2
  with pytest.raises(ValueError, match="unknown model preset"):
    Qwen2Config.preset("13b")


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    _tiny(num_heads=5, num_kv_heads=2)
  with pytest.raises(ValueError, match="attention"):
    _tiny(attention="flash")


def _real_width(preset):
  c = getattr(Qwen2Config, preset)()
  return c.replace(num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen2_5_0_5b", "qwen2_5_7b"])
def test_real_widths_two_layers(preset):
  config = _real_width(preset)
  ref = hf_reference.torch_model(config)
  ours = hf_reference.rrjax_twin(ref, config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 5))
  expected = hf_reference.torch_logits(ref, tokens)
  del ref
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), expected, atol=TOL, rtol=0)


def test_splash_attention_matches_xla_in_interpret_mode():
  """The TPU Pallas kernel, run by the Pallas interpreter on CPU, with packed segments and padding."""
  config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=128, tie_word_embeddings=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 64)
  segments = jnp.concatenate([jnp.zeros((2, 10), jnp.int32), jnp.ones((2, 60), jnp.int32),
                              jnp.full((2, 58), 2, jnp.int32)], axis=1)
  xla = Qwen2(config, rngs=nnx.Rngs(0))(tokens, segment_ids_BxT=segments)
  splash = Qwen2(config.replace(attention="splash"), rngs=nnx.Rngs(0))(tokens, segment_ids_BxT=segments)
  real = np.asarray(segments != 0)[..., None]
  np.testing.assert_allclose(np.asarray(splash) * real, np.asarray(xla) * real, atol=TOL)
  with pytest.raises(ValueError, match="divisible by 128"):
    Qwen2(config.replace(attention="splash"), rngs=nnx.Rngs(0))(tokens[:, :100])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla():
  config = _tiny(head_dim=64, dtype="bfloat16", param_dtype="float32")
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, config.vocab_size)
  xla = Qwen2(config, rngs=nnx.Rngs(0))(tokens)
  cudnn = Qwen2(config.replace(attention="cudnn"), rngs=nnx.Rngs(0))(tokens)
  np.testing.assert_allclose(np.asarray(cudnn), np.asarray(xla), atol=5e-2)


def test_auto_attention_follows_the_target_platform():
  import jax.numpy as jnp

  from rrjax import hardware
  from rrjax.model import attention

  seg = jnp.ones((1, 256), jnp.int32)
  idx = jnp.arange(256)
  self_mask = attention.Mask(seg, seg, idx, idx, causal_only=True)
  cache_mask = attention.Mask(seg[:, :1], seg, idx[:1], idx, causal_only=False)
  q_bf16, q_f32 = jnp.zeros((1, 256, 4, 16), jnp.bfloat16), jnp.zeros((1, 256, 4, 16), jnp.float32)
  assert attention.resolve("auto", q_f32, self_mask) == "xla"  # this CPU host
  with hardware.target_platform("tpu"):
    assert attention.resolve("auto", q_bf16, self_mask) == "splash"
    assert attention.resolve("auto", q_bf16[:, :100], self_mask) == "xla"  # splash needs T % 128 == 0
    assert attention.resolve("auto", q_bf16[:, :1], cache_mask) == "xla"  # one decode step against a cache
    assert hardware.default_dtype() == "bfloat16"
  with hardware.target_platform("gpu"):
    assert attention.resolve("auto", q_bf16, self_mask) == "cudnn"
    assert attention.resolve("auto", q_f32, self_mask) == "xla"  # cuDNN would round f32 to bf16
    assert attention.resolve("xla", q_bf16, self_mask) == "xla"
  assert hardware.default_dtype() == "float32" and hardware.platform() == "cpu"


@pytest.mark.parametrize("T", [300, 512])
def test_cpu_causal_attention_matches_dense_with_gradients(T):
  """The XLA:CPU causal path (blocks of keys, mapped query pieces, head-major layout, division after the
  value product) against the plain dense softmax: values and gradients, with packed segments, padding, grouped
  kv heads, and lengths that do and do not split into 32-query pieces."""
  from rrjax.model import attention

  B, N, K, H = 2, 4, 2, 16
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in ks[1:])
  cut = T // 2 + 7
  seg = jnp.concatenate([jnp.ones((B, cut), jnp.int32), jnp.full((B, T - cut - 20), 2, jnp.int32),
                         jnp.zeros((B, 20), jnp.int32)], axis=1)
  idx = jnp.arange(T)
  mask = attention.Mask(seg, seg, idx, idx, causal_only=True)
  real = (seg != 0)[..., None, None]

  def loss(attend, q, k, v):
    out = attend(q, k, v)
    return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

  dense = lambda q, k, v: attention._attend_dense(q, k, v, mask.dense_BxTxS())
  cpu = lambda q, k, v: attention._attend_causal_cpu(q, k, v, mask)
  (_, o1), g1 = jax.value_and_grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, o2), g2 = jax.value_and_grad(lambda *a: loss(cpu, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.asarray(o2) * np.asarray(real), np.asarray(o1) * np.asarray(real), atol=1e-5)
  assert np.isfinite(np.asarray(o2)).all()  # padding rows too
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)


def test_chunked_attention_matches_xla_with_gradients():
  """Query blocks under a rematerialised scan: the same values and gradients as the dense path, with packed
  segments, padding and a length that is not a multiple of the block."""
  from rrjax.model import attention

  B, T, N, K, H = 2, 300, 4, 2, 16
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in ks[1:])
  seg = jnp.concatenate([jnp.ones((B, 170), jnp.int32), jnp.full((B, 110), 2, jnp.int32),
                         jnp.zeros((B, 20), jnp.int32)], axis=1)
  idx = jnp.arange(T)
  mask = attention.Mask(seg, seg, idx, idx, causal_only=True)
  real = (seg != 0)[..., None, None]

  def loss(impl, q, k, v):
    out = attention._attend_chunked(q, k, v, mask, block=128) if impl == "chunked" else \
        attention._attend_xla(q, k, v, mask)
    return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

  (l1, o1), g1 = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (l2, o2), g2 = jax.value_and_grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.asarray(o2) * np.asarray(real), np.asarray(o1) * np.asarray(real), atol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
  with attention.gpu_kernel_stand_in():  # a cuDNN choice builds as chunked where cuDNN cannot compile
    np.testing.assert_allclose(np.asarray(attention.attend(q, k, v, mask, impl="cudnn")), np.asarray(o2),
                               atol=1e-6)
