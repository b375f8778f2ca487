"""Supervised fine-tuning on ReasonRank reasoning chains (upstream: LLaMA-Factory, full or LoRA).

Loss: the next-token cross-entropy over response tokens only, normalised by `TrainConfig.loss_norm`: the
token mean over the whole global batch ('global_token_mean'), or, as LLaMA-Factory ran under HF Trainer and
DeepSpeed, each device's token mean over its own grad_accum micro-batches, averaged over the devices
('per_device_token_mean'). A device here is a group of samples (the batch's "sample_group", see
rrjax.data.pipeline): with packing, a sample's row may lie on any device, and its weight is still
1 / (groups with labels x its group's label count). Either norm is a per-token weight computed from the batch's
label counts, so the micro-batches only sum. Log-probs come a chunk of positions at a time
(rrjax.train.logprobs): [T, V] logits never exist whole.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrjax import hardware
from rrjax import tokenizer as tokenizer_lib
from rrjax.data import pipeline  # grain is imported only where a pipeline is built
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import Qwen2Config
from rrjax.train import logprobs, optim
from rrjax import aot, cost
from rrjax.train.config import TrainConfig
from rrjax.train.state import TrainState, apply_gradients, micro_batches, scan_gradients

BATCH_AXES = ("data", "fsdp")


LOSS_NORMS = ("global_token_mean", "per_device_token_mean")


def token_nll_sums(model, batch, chunk_tokens: int = 0):
  """(sum of masked next-token NLL, number of masked tokens) for one micro-batch; log-probs `chunk_tokens`
  positions at a time (0: the whole sequence at once). A "loss_scale" [B, T] in the batch weights each token."""
  hidden_BxTxD, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets_BxT, weights_BxT = pipeline.next_token_targets(batch, xp=jnp)
  logp_BxT, _ = logprobs.token_logprobs(model, hidden_BxTxD, targets_BxT, chunk=chunk_tokens)
  weights_BxT = weights_BxT.astype(jnp.float32)
  scaled_BxT = weights_BxT * batch["loss_scale"] if "loss_scale" in batch else weights_BxT
  return -jnp.sum(logp_BxT * scaled_BxT), jnp.sum(weights_BxT)


def token_scales(batch, loss_norm: str, groups: int):
  """[N, T] factors that turn summed per-token NLL into the normalised loss: 1 / (all label tokens), or
  1 / (groups with labels x the label tokens of the token's group). Groups are the batch's "sample_group"
  (1..groups, 0 on padding), else `groups` contiguous blocks of rows (one per data shard). HF Trainer divides
  each device's loss by its own label count (transformers 4.52.4 trainer.py:5285) and DeepSpeed averages the
  devices' gradients; a group without labels (never upstream: its sampler fills every device) adds nothing and
  does not shrink the others."""
  _, weights_NxT = pipeline.next_token_targets(batch, xp=jnp)
  weights_NxT = weights_NxT.astype(jnp.float32)
  if loss_norm == "global_token_mean":
    return jnp.full(weights_NxT.shape, 1.0 / jnp.maximum(jnp.sum(weights_NxT), 1.0))
  if loss_norm != "per_device_token_mean":
    raise ValueError(f"TrainConfig.loss_norm: {loss_norm!r} is not one of {LOSS_NORMS}")
  if "sample_group" in batch:
    group_NxT = jnp.asarray(batch["sample_group"])
  else:
    rows = weights_NxT.shape[0]
    group_NxT = jnp.broadcast_to((jnp.arange(rows) * groups // rows + 1)[:, None], weights_NxT.shape)
  counts_G = jax.ops.segment_sum(weights_NxT.reshape(-1), group_NxT.reshape(-1), num_segments=groups + 1)
  counts_G = counts_G.at[0].set(0.0)  # padding
  with_labels = jnp.maximum(jnp.sum(counts_G > 0), 1)
  scale_G = jnp.where(counts_G > 0, 1.0 / (jnp.maximum(counts_G, 1.0) * with_labels), 0.0)
  return scale_G[group_NxT]


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, micro_rows: int | None = None, *,
                    shards: int = 1, chunk_tokens: int = 0, loss_norm: str = "global_token_mean",
                    loss_groups: int | None = None, loss_sums=token_nll_sums):
  """A pure step: (state, batch of [N, T] arrays) -> (state, metrics). The batch is split into micro-batches
  of `micro_rows` rows (None: one), each of the `shards` data shards feeding every micro-batch from its own
  rows; per-token weights (`token_scales` over `loss_groups` groups, default one per shard) make the
  accumulated gradient that of the normalised loss."""
  if loss_norm not in LOSS_NORMS:
    raise ValueError(f"TrainConfig.loss_norm: {loss_norm!r} is not one of {LOSS_NORMS}")

  def sums(params, frozen, micro):
    total, count = loss_sums(nnx.merge(graphdef, params, frozen), micro, chunk_tokens)
    return total, {"count": count}

  def step(state: TrainState, batch: dict[str, jax.Array]):
    rows = batch["tokens"].shape[0]
    steps = rows // (micro_rows or rows)
    batch = dict(batch, loss_scale=token_scales(batch, loss_norm, loss_groups or shards))
    micro = micro_batches(batch, steps, shards if steps > 1 else 1)
    loss, aux, grads = scan_gradients(lambda p, mb: sums(p, state.frozen, mb), state.params, micro)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step),
               "tokens": aux["count"]}
    return apply_gradients(state, grads, tx), metrics

  return step


def prepare_source(config: TrainConfig, tokenizer: tokenizer_lib.Tokenizer):
  """Builds (once) and opens the TFDS ArrayRecord dataset of the configured SFT files."""
  from rrjax.data import builders  # TFDS: only where data is read

  d = config.sft_data
  if not d.train_files:
    raise ValueError("SFTDataConfig.train_files: no training files configured")
  data_dir = Path(d.data_dir or Path(config.run_dir) / "data")
  if jax.process_index() == 0:
    sources = [builders.SFTSource(f, d.id_query, d.id_doc) for f in d.train_files]
    builders.build_sft(data_dir, {"train": sources}, tokenizer=tokenizer,
                       settings=builders.BuildSettings(cutoff_len=d.cutoff_len,
                                                       max_passage_tokens=d.max_passage_tokens))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("rrjax_sft_data_built")
  return builders.load_source(data_dir, "train")


class SFTTrainer:
  """SFT for the shared loop (rrjax.train.loop.run). `compile_only` builds what preflight needs and reads no
  data (total_steps is then num_steps, or 1)."""

  def __init__(self, config: TrainConfig, mesh: Mesh, model_cfg: Qwen2Config, tokenizer: tokenizer_lib.Tokenizer, *,
               source=None, compile_only: bool = False):
    self.config, self.mesh, self.model_cfg = config, mesh, model_cfg
    self.packing = pipeline.packing_mode(config.sft_data.packing)
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (config.grad_accum * self.shards):
      raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be a multiple of grad_accum "
                       f"({config.grad_accum}) x data shards ({self.shards})")
    self.processes = jax.process_count()
    if config.batch_size % self.processes:
      raise ValueError(f"TrainConfig.batch_size={config.batch_size} is not divisible by "
                       f"{self.processes} processes")
    # Rows of one micro-step over all devices; with packing='samples' the number of micro-steps varies.
    self.micro_rows = config.batch_size // config.grad_accum
    # Loss-normalisation groups, one per data shard (upstream: one per GPU); each process draws its own devices'.
    self.local_groups = max(1, self.shards // self.processes)
    if self.micro_rows % self.processes:
      raise ValueError(f"TrainConfig.batch_size / grad_accum = {self.micro_rows} rows per micro-step is not "
                       f"divisible by {self.processes} processes")
    if compile_only:
      self.source = None
      self.total_steps = max(config.num_steps, 1)
    else:
      self.source = source if source is not None else prepare_source(config, tokenizer)
      self.total_steps = config.num_steps if config.num_steps > 0 else self._count_batches()
    self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, self.total_steps)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    self.flops_per_token = 3 * model_cfg.forward_flops(1, config.sft_data.seq_len) / config.sft_data.seq_len
    self._executables: dict[tuple[int, int], object] = {}

  @functools.cached_property
  def peak_flops(self) -> float:
    """The devices' peak (measured once, when MFU is first logged, on CPU)."""
    return hardware.peak_flops()[0] * jax.device_count()

  def _iterator(self, num_epochs):
    c = self.config
    return pipeline.make_sft_iterator(
        self.source, batch_size=c.batch_size // self.processes, seq_len=c.sft_data.seq_len, seed=c.seed,
        shuffle=c.sft_data.shuffle, num_epochs=num_epochs, process_index=jax.process_index(),
        process_count=self.processes, packing=c.sft_data.packing, row_multiple=self.micro_rows // self.processes,
        loss_groups=self.local_groups)

  def _count_batches(self) -> int:
    return sum(1 for _ in self._iterator(self.config.num_epochs))

  def data_iterator(self):
    return self._iterator(None if self.config.num_steps > 0 else self.config.num_epochs)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k], np.int32))
            for k in pipeline.BATCH_KEYS}

  def bind(self, lay) -> None:
    """Receives the state layout (graphdef and shardings) from the loop before the first step."""
    self.lay = lay
    step = make_train_step(lay.graphdef, self.tx, self.lr_schedule, self.micro_rows, shards=self.shards,
                           chunk_tokens=self.config.loss_chunk_tokens, loss_norm=self.config.loss_norm,
                           loss_groups=self.local_groups * self.processes)
    self._step = jax.jit(step, in_shardings=(lay.shardings, self.batch_sharding),
                         out_shardings=(lay.shardings, None), donate_argnums=(0,))

  def _abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (rows, self.config.sft_data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding) for k in pipeline.BATCH_KEYS}

  def programs(self, hbm_bytes: int | None = None) -> list[aot.Program]:
    """The step at the largest batch the data can produce (every example on its own row); its memory is the
    compiler's to measure (`hbm_bytes` plans nothing here)."""
    cfg, seq = self.model_cfg, self.config.sft_data.seq_len
    kernel = attention_lib.kernel_for(cfg.attention, seq, cfg.dtype, cfg.head_dim)
    work = cost.Work(cfg, "train", self.config.batch_size, seq, frozen_base=bool(cfg.lora.rank))
    return [aot.Program("train_step", self._step, (self.lay.abstract, self._abstract_batch(
        self.config.batch_size)), attention=kernel, work=work)]

  def tokens_per_step(self) -> int:
    return self.config.batch_size * self.config.sft_data.seq_len

  def adopt(self, program: aot.Program, compiled) -> None:
    """Keeps a preflight-compiled step for its batch shape, so the run does not compile it again."""
    self._executables[tuple(program.args[1]["tokens"].shape)] = compiled

  def _agree_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """With packing='samples' processes pack different row counts: all pad to the largest."""
    if self.packing != "samples" or self.processes == 1:
      return batch
    from rrjax import distributed
    rows = max(distributed.allgather_json(int(batch["tokens"].shape[0])))
    pad = rows - batch["tokens"].shape[0]
    return {k: np.pad(np.asarray(v), ((0, pad), (0, 0))) for k, v in batch.items()} if pad else batch

  def step(self, state: TrainState, batch: dict[str, np.ndarray]):
    batch = self._agree_rows({k: batch[k] for k in pipeline.BATCH_KEYS})
    rows = batch["tokens"].shape[0] * self.processes
    shape = (rows, batch["tokens"].shape[1])
    with jax.set_mesh(self.mesh):
      if shape not in self._executables:
        self._executables[shape] = self._step.lower(self.lay.abstract, self._abstract_batch(rows)).compile()
      new_state, metrics = self._executables[shape](state, self.global_batch(batch))
    real = int(np.asarray(batch["segment_ids"] > 0).sum()) * self.processes
    metrics = dict(metrics)
    metrics["seq_tokens"] = real  # real tokens: throughput and MFU count no padding
    metrics["real_token_frac"] = real / (rows * shape[1])
    return new_state, metrics
