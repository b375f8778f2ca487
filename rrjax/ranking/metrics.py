"""Ranking metrics in jnp, vectorized over a batch of ranked lists.

Representation (B lists, each padded to L ranks; R judged documents per query, padded):
- `gains_BxL`: relevance grade of the document at each rank, in rank order; 0 for unjudged
  documents and for padding. Padding must be trailing, or masked out with `mask_BxL`.
- `judged_BxR`: grades of *every* judged document of the query (any order, padded with 0), so the
  ideal DCG and the recall denominator count relevant documents the list never retrieved.
- `k`: a static Python int cutoff (None = the whole list).

Semantics follow trec_eval (`ndcg_cut`, `recall`, `recip_rank`, `map_cut`): linear gains with
negatives clipped to 0, discount log2(rank + 1) with 1-based ranks, binary measures count a document
as relevant when its grade >= `rel_level`, and a query with no relevant document scores 0.
Everything is jit/vmap friendly: shapes are static and there are no Python loops over items.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked(gains_BxL: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
  gains_BxL = jnp.asarray(gains_BxL)
  if mask_BxL is None:
    return gains_BxL
  return jnp.where(jnp.asarray(mask_BxL), gains_BxL, jnp.zeros((), gains_BxL.dtype))


def _cut(x_BxL: jax.Array, k: int | None) -> jax.Array:
  """First k columns; a list shorter than k needs no padding since padding scores nothing."""
  return x_BxL if k is None else x_BxL[:, :k]


def _float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.result_type(float))


def dcg_at_k(gains_BxL: jax.Array, k: int | None, mask_BxL: jax.Array | None = None) -> jax.Array:
  """DCG@k with trec_eval's linear gain and 1/log2(rank + 1) discount: [B]."""
  g_BxK = _float(jnp.maximum(_cut(_masked(gains_BxL, mask_BxL), k), 0))
  discount_K = 1.0 / jnp.log2(jnp.arange(g_BxK.shape[-1], dtype=g_BxK.dtype) + 2.0)
  return jnp.sum(g_BxK * discount_K, axis=-1)


def ndcg_at_k(gains_BxL: jax.Array, judged_BxR: jax.Array, k: int | None,
              mask_BxL: jax.Array | None = None) -> jax.Array:
  """nDCG@k: [B]. The ideal ranking is all judged grades sorted descending (k=None: no cut)."""
  gains_BxL = _masked(gains_BxL, mask_BxL)
  judged_BxR = jnp.maximum(jnp.asarray(judged_BxR), 0)
  if k is None:
    # trec_eval's uncut ndcg: the ideal runs over every relevant document.
    k_ideal = judged_BxR.shape[-1]
  else:
    k_ideal = min(k, judged_BxR.shape[-1])
  ideal_BxK = -jnp.sort(-judged_BxR, axis=-1)[:, :k_ideal]
  dcg_B = dcg_at_k(gains_BxL, k)
  idcg_B = dcg_at_k(ideal_BxK, None)
  return jnp.where(idcg_B > 0, dcg_B / jnp.where(idcg_B > 0, idcg_B, 1.0), 0.0)


def num_relevant(judged_BxR: jax.Array, rel_level: int = 1) -> jax.Array:
  """Relevant documents per query (grade >= rel_level): [B] int."""
  return jnp.sum(jnp.asarray(judged_BxR) >= rel_level, axis=-1)


def recall_at_k(gains_BxL: jax.Array, judged_BxR: jax.Array, k: int | None, rel_level: int = 1,
                mask_BxL: jax.Array | None = None) -> jax.Array:
  """Recall@k over all relevant documents of the query (order inside the cut is irrelevant): [B]."""
  rel_BxK = _cut(_masked(gains_BxL, mask_BxL), k) >= rel_level
  hits_B = _float(jnp.sum(rel_BxK, axis=-1))
  nrel_B = _float(num_relevant(judged_BxR, rel_level))
  return jnp.where(nrel_B > 0, hits_B / jnp.maximum(nrel_B, 1.0), 0.0)


def precision_at_k(gains_BxL: jax.Array, k: int | None, rel_level: int = 1,
                   mask_BxL: jax.Array | None = None) -> jax.Array:
  """P@k as trec_eval P_k: relevant in the top k over k, even when fewer were retrieved: [B]."""
  rel_BxK = _cut(_masked(gains_BxL, mask_BxL), k) >= rel_level
  denom = rel_BxK.shape[-1] if k is None else k
  return _float(jnp.sum(rel_BxK, axis=-1)) / denom


def mrr_at_k(gains_BxL: jax.Array, k: int | None = None, rel_level: int = 1,
             mask_BxL: jax.Array | None = None) -> jax.Array:
  """Reciprocal rank of the first relevant document within the top k (0 if none): [B]."""
  rel_BxK = _cut(_masked(gains_BxL, mask_BxL), k) >= rel_level
  first_B = jnp.argmax(rel_BxK, axis=-1)
  return jnp.where(jnp.any(rel_BxK, axis=-1), 1.0 / _float(first_B + 1), 0.0)


def map_at_k(gains_BxL: jax.Array, judged_BxR: jax.Array, k: int | None, rel_level: int = 1,
             mask_BxL: jax.Array | None = None) -> jax.Array:
  """Average precision cut at k (trec_eval map_cut_k), normalised by all relevant documents: [B]."""
  rel_BxK = _float(_cut(_masked(gains_BxL, mask_BxL), k) >= rel_level)
  rank_K = jnp.arange(1, rel_BxK.shape[-1] + 1, dtype=rel_BxK.dtype)
  prec_BxK = jnp.cumsum(rel_BxK, axis=-1) / rank_K
  nrel_B = _float(num_relevant(judged_BxR, rel_level))
  ap_B = jnp.sum(prec_BxK * rel_BxK, axis=-1)
  return jnp.where(nrel_B > 0, ap_B / jnp.maximum(nrel_B, 1.0), 0.0)


def rbo(ids_a_BxL: jax.Array, ids_b_BxM: jax.Array, p: float = 1.0, pad_id: int = -1) -> jax.Array:
  """Rank-biased overlap of two id lists per row, as the `rbo` package's `rbo(p=p)`: [B].

  Lists hold integer ids padded at the end with `pad_id`, and (like the package, which asserts it)
  no repeated id. The depth is min(len_a, len_b); A_d = |a[:d] & b[:d]| / d. p = 1.0 gives the
  average overlap mean(A_1..A_k) (ReasonRank's setting); p < 1 gives sum (1-p) p^(d-1) A_d without
  extrapolation. Two empty lists score 1 and one empty list scores 0, as in the package.
  """
  ids_a_BxL = jnp.asarray(ids_a_BxL)
  ids_b_BxM = jnp.asarray(ids_b_BxM)
  width = max(ids_a_BxL.shape[-1], ids_b_BxM.shape[-1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[-1])), constant_values=pad_id)
  a_BxD, b_BxD = pad(ids_a_BxL), pad(ids_b_BxM)
  len_a_B = jnp.sum(a_BxD != pad_id, axis=-1)
  len_b_B = jnp.sum(b_BxD != pad_id, axis=-1)
  depth_B = jnp.minimum(len_a_B, len_b_B)
  match_BxDxD = (a_BxD[:, :, None] == b_BxD[:, None, :]) & (a_BxD != pad_id)[:, :, None]
  # overlap at depth d is the number of matches (i, j) with i, j < d: a 2-D prefix sum's diagonal.
  prefix_BxDxD = jnp.cumsum(jnp.cumsum(match_BxDxD.astype(jnp.int32), axis=1), axis=2)
  overlap_BxD = jnp.diagonal(prefix_BxDxD, axis1=1, axis2=2)
  d_D = jnp.arange(1, width + 1)
  agree_BxD = _float(overlap_BxD) / _float(d_D)
  in_depth_BxD = d_D[None, :] <= depth_B[:, None]
  if p == 1.0:
    score_B = jnp.sum(jnp.where(in_depth_BxD, agree_BxD, 0.0), axis=-1) / _float(jnp.maximum(depth_B, 1))
  else:
    if not 0.0 < p < 1.0:
      raise ValueError(f"rbo: p must be in (0, 1] (got {p})")
    weight_D = (1.0 - p) * p ** _float(d_D - 1)
    score_B = jnp.sum(jnp.where(in_depth_BxD, weight_D * agree_BxD, 0.0), axis=-1)
  score_B = jnp.clip(score_B, 0.0, 1.0)
  both_empty_B = (len_a_B == 0) & (len_b_B == 0)
  return jnp.where(both_empty_B, 1.0, jnp.where(depth_B == 0, 0.0, score_B))
