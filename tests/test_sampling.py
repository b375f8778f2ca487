"""rrjax.sampling.select against a NumPy transcription of vLLM's sampler (V1 `Sampler.sample`: temperature,
min-p, top-k, top-p), on fixed logits: the support it draws from and the frequencies of many draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrjax import sampling

V = 48
LOGITS_V = np.random.default_rng(0).normal(0.0, 2.0, V).astype(np.float32)
DRAWS = 4096


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def vllm_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, *, min_p_last=False):
  """The distribution vLLM samples from, written from its code (float64): logits / T; min-p masks tokens whose
  softmax probability is below min_p * max (MinP processor); top-k masks logits below the k-th largest; top-p
  sorts ascending, masks where the cumulative softmax is <= 1 - p, keeping the largest. `min_p_last`: vLLM V0's
  order (min-p after top-k/top-p)."""
  x = logits.astype(np.float64) / temperature

  def min_p_mask(x):
    probs = _softmax(x)
    return np.where(probs < min_p * probs.max(), -np.inf, x)

  if min_p and not min_p_last:
    x = min_p_mask(x)
  if top_k:
    kth = np.sort(x)[-top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1.0:
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(_softmax(x[order]))
    drop = cum <= 1 - top_p
    drop[-1] = False
    x[order[drop]] = -np.inf
  if min_p and min_p_last:
    x = min_p_mask(x)
  return _softmax(x)


def _draw(temperature, top_k, top_p, min_p, seed=0):
  keys = jax.random.split(jax.random.key(seed), DRAWS)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS_V), (DRAWS, V))
  s = sampling.Sampling(temperature, top_k, top_p, min_p)
  greedy, k, nucleus, mp = s.static_key()
  fn = jax.jit(lambda lg, ky: sampling.select(lg, ky, temperature=temperature, top_p=top_p, greedy=greedy, top_k=k,
                                              nucleus=nucleus, min_p=mp))
  tokens, logprobs = fn(logits, keys)
  return np.asarray(tokens), np.asarray(logprobs)


CASES = {
    "reasonrank-8b": (0.6, 20, 0.95, 0.0),  # upstream's rank_GPT_qwen3 decoding
    "min-p only": (1.0, 0, 1.0, 0.1),
    "all four": (0.8, 12, 0.7, 0.08),
    "top-k only": (1.3, 5, 1.0, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_draws_follow_vllms_filtered_distribution(case):
  temperature, top_k, top_p, min_p = CASES[case]
  probs = vllm_probs(LOGITS_V, temperature, top_k, top_p, min_p)
  tokens, logprobs = _draw(temperature, top_k, top_p, min_p)
  support = set(np.flatnonzero(probs))
  assert set(tokens.tolist()) <= support, sorted(set(tokens.tolist()) - support)
  assert 2 <= len(support) < V  # the filters bite, and leave a choice
  counts = np.bincount(tokens, minlength=V)
  keep = probs * DRAWS >= 5
  expected = probs[keep] * DRAWS
  stat = ((counts[keep] - expected) ** 2 / expected).sum()
  dof = max(int(keep.sum()) - 1, 1)
  assert stat < dof + 6 * np.sqrt(2 * dof) + 10, (stat, dof)
  # logprobs are the tempered policy's, before any filter.
  policy = np.log(_softmax(LOGITS_V.astype(np.float64) / temperature))
  np.testing.assert_allclose(logprobs, policy[tokens], atol=1e-5)


def test_min_p_comes_before_top_p_as_in_vllm_v1():
  """With these settings vLLM V0's order (min-p last) keeps a different set: the test can tell the orders apart."""
  temperature, top_k, top_p, min_p = CASES["all four"]
  v1 = set(np.flatnonzero(vllm_probs(LOGITS_V, temperature, top_k, top_p, min_p)))
  v0 = set(np.flatnonzero(vllm_probs(LOGITS_V, temperature, top_k, top_p, min_p, min_p_last=True)))
  assert v1 != v0
  tokens, _ = _draw(temperature, top_k, top_p, min_p, seed=1)
  assert set(tokens.tolist()) <= v1 and set(tokens.tolist()) == v1  # every kept token is drawn at 4096 draws


def test_min_p_keeps_the_top_token_and_one_means_greedy():
  tokens, _ = _draw(1.0, 0, 1.0, 1.0)
  assert set(tokens.tolist()) == {int(np.argmax(LOGITS_V))}
  with pytest.raises(ValueError, match="min_p=1.5"):
    sampling.Sampling(1.0, min_p=1.5)
  assert sampling.Sampling(0.0, 20, 0.95, 0.3).static_key() == (True, 0, False, 0.0)  # greedy ignores filters


def test_argmax_is_numpys_on_ties_infinities_and_nans():
  x = np.random.default_rng(1).standard_normal((7, 1000)).astype(np.float32)
  x[1, 5] = x[1, 7] = np.nan  # the first NaN, as jnp.argmax
  x[2, :] = -np.inf
  x[3, 3] = x[3, 9] = 100.0  # ties: the first
  x[4, :] = np.inf
  x[5, 4] = np.inf
  x[6, -1] = 50.0  # the last id
  got = np.asarray(sampling.argmax(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, [int(np.argmax(r)) for r in x])
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
