"""grain pipeline for SFT: seeded shuffle, per-process slice, packing (or padding), batching.

`make_sft_iterator(source, ...)` returns a grain `DatasetIterator` of numpy batches
  {"tokens", "loss_mask", "segment_ids", "positions", "sample_group"}: int32 [batch_size, seq_len] each,
where segment_ids number the examples in a row from 1 (0 = padding), positions restart at 0 for each example
(0 on padding), and sample_group is the loss-normalisation group of each token's example (1-based, 0 on
padding): the device that example would have trained on upstream (see `pack_samples`, `loss_groups`). Its
`get_state()` / `set_state()` are the checkpointable state: restoring a saved state on a fresh iterator built
with the same arguments yields exactly the remaining batches.

Order of operations: global seeded shuffle (a new permutation each epoch) -> repeat(num_epochs) ->
process slice `[process_index::process_count]` of that stream (disjoint, covering) -> pack/pad -> batch.
`packing` is one of
  False ("none"): one example per row, padded to seq_len;
  True ("rows"): examples placed whole by first fit into `batch_size` rows of `seq_len` tokens (the number of
    examples per batch varies);
  "samples": exactly `batch_size` examples per batch (the last one of a finite stream may have fewer),
    packed first-fit-decreasing into as few rows as hold them, the row count rounded up to a multiple of
    `row_multiple` (so the batch has a whole number of micro-batches): the batch's row count varies. The
    batch's examples, in stream order, are split into `loss_groups` consecutive groups: group g holds the
    examples a per-device micro-batch on this process's g-th device would have drawn.
With the other modes a row's group is its device: `loss_groups` consecutive blocks of rows.
An example is never split across rows; one longer than seq_len is cut to its first seq_len tokens (build
with cutoff_len <= seq_len to get LLaMA-Factory's proportional cut instead). The last batch of a finite
stream is padded with empty rows (all zeros, segment 0) rather than dropped. Packed processes can emit
different batch counts: multi-host training should use num_epochs=None and stop on a step count.

Tokens and loss_mask are aligned (loss_mask[t] marks tokens[t] as a response token); the loss shifts
them, see `next_token_targets`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
  import grain

# grain is imported where a pipeline is built: the batch layout and `next_token_targets` serve machines
# without it (the benchmarks' device image).

BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "sample_group")
PACKING_MODES = {False: "none", True: "rows", "none": "none", "rows": "rows", "samples": "samples"}


def packing_mode(packing) -> str:
  """'none', 'rows' or 'samples' for a `packing` setting (False/True or one of those names)."""
  try:
    return PACKING_MODES[packing]
  except (KeyError, TypeError):
    raise ValueError(f"SFTDataConfig.packing: {packing!r} is not one of False, True, 'rows', 'samples'") from None


def _prepare(record: Mapping[str, Any], seq_len: int) -> dict[str, np.ndarray]:
  # Drop the text fields: only int32 sequences travel through packing and batching.
  tokens = np.asarray(record["tokens"], np.int32)[:seq_len]
  loss_mask = np.asarray(record["loss_mask"], np.int32)[:seq_len]
  if tokens.shape != loss_mask.shape:
    raise ValueError(f"tokens and loss_mask lengths differ: {tokens.shape} vs {loss_mask.shape}")
  return {"tokens": tokens, "loss_mask": loss_mask}


def _pad(example: Mapping[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  n = len(example["tokens"])
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = example["tokens"]
  loss_mask = np.zeros(seq_len, np.int32)
  loss_mask[:n] = example["loss_mask"]
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:n] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[:n] = np.arange(n, dtype=np.int32)
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions,
          "sample_group": segment_ids.copy()}


def _from_packed(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = packed["tokens_segment_ids"].astype(np.int32)
  return {"tokens": packed["tokens"], "loss_mask": packed["loss_mask"], "segment_ids": segment_ids,
          "positions": packed["tokens_positions"].astype(np.int32), "sample_group": (segment_ids > 0).astype(np.int32)}


def _row_block_groups(batch: Mapping[str, np.ndarray], groups: int, offset: int) -> dict[str, np.ndarray]:
  """sample_group for one-row-per-device-block batches: row r of B belongs to group offset + r * groups // B + 1."""
  rows = batch["segment_ids"].shape[0]
  group_B = offset + np.arange(rows) * groups // rows + 1
  return dict(batch, sample_group=((batch["segment_ids"] > 0) * group_B[:, None]).astype(np.int32))


def pack_samples(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int, row_multiple: int = 1,
                 pad_id: int = 0, loss_groups: int = 1, group_offset: int = 0) -> dict[str, np.ndarray]:
  """Packs `examples` (tokens, loss_mask) first-fit-decreasing into rows of seq_len: segment ids 1, 2, ...
  within a row, positions restarting at 0 for each example; the row count is rounded up to a multiple of
  `row_multiple` with empty rows. The examples, in the given (drawn) order, form `loss_groups` consecutive
  groups of as equal size as they split into (numpy's array_split; fewer examples than groups leave the last
  groups empty); every token of an example carries its group, group_offset + 1, + 2, ..., in sample_group.
  Where an example's row lies does not change its loss: the groups carry upstream's per-device normalisation."""
  group_E = np.concatenate([np.full(len(part), g, np.int32) for g, part in
                            enumerate(np.array_split(np.arange(len(examples)), loss_groups))]) + group_offset + 1
  order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["tokens"]), i))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = len(examples[i]["tokens"])
    slot = next((r for r, f in enumerate(free) if f >= n), None)
    if slot is None:
      rows.append([])
      free.append(seq_len)
      slot = len(rows) - 1
    rows[slot].append(i)
    free[slot] -= n
  count = max(1, -(-len(rows) // row_multiple)) * row_multiple
  out = {k: np.zeros((count, seq_len), np.int32) for k in BATCH_KEYS}
  out["tokens"][:] = pad_id
  for r, members in enumerate(rows):
    at = 0
    for seg, i in enumerate(sorted(members), start=1):  # file order inside a row
      n = len(examples[i]["tokens"])
      out["tokens"][r, at:at + n] = examples[i]["tokens"]
      out["loss_mask"][r, at:at + n] = examples[i]["loss_mask"]
      out["segment_ids"][r, at:at + n] = seg
      out["positions"][r, at:at + n] = np.arange(n, dtype=np.int32)
      out["sample_group"][r, at:at + n] = group_E[i]
      at += n
  return out


def make_sft_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int, seq_len: int, seed: int,
                     shuffle: bool = True, num_epochs: int | None = 1, process_index: int = 0,
                     process_count: int = 1, packing: bool | str = True, pad_id: int = 0, row_multiple: int = 1,
                     loss_groups: int = 1, read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The grain IterDataset behind `make_sft_iterator` (same arguments)."""
  import grain

  mode = packing_mode(packing)
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if len(source) == 0:
    raise ValueError("the SFT source is empty")
  if loss_groups <= 0:
    raise ValueError(f"loss_groups must be positive, got {loss_groups}")
  offset = process_index * loss_groups  # this process's devices' groups: global ids across processes
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.map(functools.partial(_prepare, seq_len=seq_len))
  if mode == "samples":
    ds = ds.batch(batch_size, batch_fn=list).map(
        functools.partial(pack_samples, seq_len=seq_len, row_multiple=row_multiple, pad_id=pad_id,
                          loss_groups=loss_groups, group_offset=offset))
    return ds.to_iter_dataset(read_options) if read_options is not None else ds.to_iter_dataset()
  it = ds.to_iter_dataset(read_options) if read_options is not None else ds.to_iter_dataset()
  if mode == "rows":
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=batch_size,
        seed=seed, shuffle_bins=shuffle, padding_struct={"tokens": pad_id, "loss_mask": 0})
    it = it.map(_from_packed)
  else:
    it = it.map(functools.partial(_pad, seq_len=seq_len, pad_id=pad_id))
  it = it.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
  return it.map(functools.partial(_row_block_groups, groups=loss_groups, offset=offset))


def make_sft_iterator(source: Sequence[Mapping[str, Any]], *, batch_size: int, seq_len: int, seed: int,
                      shuffle: bool = True, num_epochs: int | None = 1, process_index: int = 0,
                      process_count: int = 1, packing: bool | str = True, pad_id: int = 0, row_multiple: int = 1,
                      loss_groups: int = 1, read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """An iterator of int32 [rows, seq_len] batches (rows = batch_size unless packing is "samples") with
  checkpointable get_state/set_state.

  `source` is any random-access sequence of records with "tokens" and "loss_mask" (e.g.
  rrjax.data.builders.load_source). num_epochs=None repeats forever. `loss_groups`: this process's devices
  (the loss is normalised per group as upstream normalises it per GPU).
  """
  return iter(make_sft_dataset(
      source, batch_size=batch_size, seq_len=seq_len, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count, packing=packing, pad_id=pad_id,
      row_multiple=row_multiple, loss_groups=loss_groups, read_options=read_options))


def next_token_targets(batch: Mapping[str, Any], xp=np) -> tuple[Any, Any]:
  """(targets_BxT, weights_BxT) for a causal LM: position t predicts tokens[t+1].

  The weight is loss_mask[t+1] where t and t+1 are in the same example (segment), else 0; the last
  position has weight 0. Pass xp=jax.numpy to compute it on device inside the train step.
  """
  tokens_BxT = xp.asarray(batch["tokens"])
  mask_BxT = xp.asarray(batch["loss_mask"])
  seg_BxT = xp.asarray(batch["segment_ids"])
  zeros_Bx1 = xp.zeros_like(tokens_BxT[:, :1])
  targets_BxT = xp.concatenate([tokens_BxT[:, 1:], zeros_Bx1], axis=1)
  same_BxT = (seg_BxT[:, 1:] == seg_BxT[:, :-1]) & (seg_BxT[:, 1:] > 0)
  weights_BxT = xp.concatenate([mask_BxT[:, 1:] * same_BxT.astype(mask_BxT.dtype), zeros_Bx1.astype(mask_BxT.dtype)],
                               axis=1)
  return targets_BxT, weights_BxT
