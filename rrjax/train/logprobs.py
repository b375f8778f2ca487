"""Next-token log-probabilities (and entropies) from final hidden states, a chunk of positions at a time.

At ReasonRank's lengths the float32 logits of a whole sequence do not fit: [23,552, 152,064] is 14 GB, and
log_softmax and its gradient need as much again. `token_logprobs` scans over chunks of `chunk` positions
with a rematerialised body, so only [B, chunk, V] logits exist at once, in the forward and the backward
pass (the scan alone would keep every chunk's logits for the backward; the remat is what saves the memory).
`chunk <= 0` computes the whole sequence at once: the reference path, same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _one(model, hidden_BxCxD, targets_BxC, temperature: float, entropy: bool):
  logits_BxCxV = model.logits(hidden_BxCxD)
  if temperature != 1.0:
    logits_BxCxV = logits_BxCxV / temperature
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  logp_BxC = target_BxC - lse_BxC
  if not entropy:
    return logp_BxC, None
  probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
  return logp_BxC, lse_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)


def token_logprobs(model, hidden_BxTxD, targets_BxT, *, chunk: int = 0, temperature: float = 1.0,
                   entropy: bool = False):
  """(log p(targets[b, t] | hidden[b, t]), entropy of that distribution or None), float32 [B, T] each, under
  softmax(logits / temperature). `chunk` positions of every row at a time (0: all at once)."""
  B, T, D = hidden_BxTxD.shape
  if chunk <= 0 or chunk >= T:
    return _one(model, hidden_BxTxD, targets_BxT, temperature, entropy)
  n = -(-T // chunk)
  pad = n * chunk - T  # padded positions compute a throwaway log-prob of token 0, cut off below
  hidden_nxBxCxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
  targets_nxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def body(_, xs):
    logp, ent = _one(model, *xs, temperature, entropy)
    return None, (logp, ent)

  _, (logp_nxBxC, ent_nxBxC) = jax.lax.scan(body, None, (hidden_nxBxCxD, targets_nxBxC))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
  return unchunk(logp_nxBxC), None if ent_nxBxC is None else unchunk(ent_nxBxC)
