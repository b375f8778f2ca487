"""Next-token selection: greedy, temperature, top-k and top-p (nucleus), with per-row logprobs.

Shapes: B batch, V vocab, K candidates kept by top-k (V when only top-p is on).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def static_key(self) -> tuple[bool, int, bool]:
    """What changes the compiled program (temperature and top_p values are run-time inputs)."""
    if self.greedy:
      return (True, 0, False)
    return (False, self.top_k, self.top_p < 1.0)


def row_keys(key, step, row_ids_B):
  """One key per row and step, folded from the call's key, so a row's draws do not depend on which
  batch, bucket or device it lands in."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, row_ids_B)


def select(logits_BxV, keys_B, *, temperature, top_p, banned_V=None, ban_B=None, greedy: bool,
           top_k: int = 0, nucleus: bool = False):
  """Chooses one token per row; returns (tokens_B int32, logprobs_B float32).

  logprobs are log_softmax(logits / temperature) (plain log_softmax when greedy) at the chosen token,
  before the top-k/top-p filters and the min-new-tokens ban: the policy's own probability, which is
  what GRPO's ratio and KL need. `banned_V` (bool) tokens are excluded in rows where `ban_B` is set.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  scaled_BxV = logits_BxV if greedy else logits_BxV / temperature
  masked_BxV = scaled_BxV
  if banned_V is not None:
    masked_BxV = jnp.where(ban_B[:, None] & banned_V[None, :], -jnp.inf, scaled_BxV)

  if greedy:
    tokens_B = jnp.argmax(masked_BxV, axis=-1).astype(jnp.int32)
  elif top_k or nucleus:
    k = min(top_k, masked_BxV.shape[-1]) if top_k else masked_BxV.shape[-1]
    vals_BxK, idx_BxK = jax.lax.top_k(masked_BxV, k)  # sorted, largest first
    if nucleus:
      probs_BxK = jax.nn.softmax(vals_BxK, axis=-1)
      before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
      # Keep the smallest prefix whose mass reaches top_p; the first candidate always survives.
      keep_BxK = (before_BxK < top_p) | (jnp.arange(k) == 0)
      vals_BxK = jnp.where(keep_BxK, vals_BxK, -jnp.inf)
    choice_B = jax.vmap(jax.random.categorical)(keys_B, vals_BxK)
    tokens_B = jnp.take_along_axis(idx_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  else:
    tokens_B = jax.vmap(jax.random.categorical)(keys_B, masked_BxV).astype(jnp.int32)

  logprobs_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  logprobs_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, logprobs_B
