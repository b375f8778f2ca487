"""Supervised fine-tuning on ReasonRank reasoning chains (upstream: LLaMA-Factory, full or LoRA).

Loss: the token mean of the next-token cross-entropy over response tokens only, across the whole global
batch (all gradient-accumulation micro-batches together), as LLaMA-Factory computes it.
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
from rrjax.data import builders, pipeline
from rrjax.model.qwen2 import Qwen2Config
from rrjax.train import optim
from rrjax.train.config import TrainConfig
from rrjax.train.state import TrainState, apply_gradients

BATCH_AXES = ("data", "fsdp")


def token_nll_sums(model, batch):
  """(sum of masked next-token NLL, number of masked tokens) for one micro-batch."""
  logits_BxTxV = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets_BxT, weights_BxT = pipeline.next_token_targets(batch, xp=jnp)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  weights_BxT = weights_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int,
                    loss_sums=token_nll_sums):
  """A pure step: (state, batch of [A*b, T] arrays) -> (state, metrics). Gradients of the summed loss
  are accumulated over A micro-batches and divided once by the total token count."""

  def sums(params, frozen, micro):
    return loss_sums(nnx.merge(graphdef, params, frozen), micro)

  grad_fn = jax.value_and_grad(sums, has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, mb):
      loss_sum, count, grads = carry
      (l, n), g = grad_fn(state.params, state.frozen, mb)
      return (loss_sum + l, count + n, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), jnp.float32(0), zeros), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step),
               "tokens": count}
    return apply_gradients(state, grads, tx), metrics

  return step


def prepare_source(config: TrainConfig, tokenizer: tokenizer_lib.Tokenizer):
  """Builds (once) and opens the TFDS ArrayRecord dataset of the configured SFT files."""
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
  """SFT for the shared loop (rrjax.train.loop.run)."""

  def __init__(self, config: TrainConfig, mesh: Mesh, model_cfg: Qwen2Config, tokenizer: tokenizer_lib.Tokenizer, *,
               source=None):
    self.config, self.mesh, self.model_cfg = config, mesh, model_cfg
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (config.grad_accum * data_shards):
      raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be a multiple of grad_accum "
                       f"({config.grad_accum}) x data shards ({data_shards})")
    if config.batch_size % jax.process_count():
      raise ValueError(f"TrainConfig.batch_size={config.batch_size} is not divisible by "
                       f"{jax.process_count()} processes")
    self.source = source if source is not None else prepare_source(config, tokenizer)
    self.total_steps = config.num_steps if config.num_steps > 0 else self._count_batches()
    self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, self.total_steps)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    self.flops_per_token = 3 * model_cfg.forward_flops(1, config.sft_data.seq_len) / config.sft_data.seq_len

  @functools.cached_property
  def peak_flops(self) -> float:
    """The devices' peak (measured once, when MFU is first logged, on CPU)."""
    return hardware.peak_flops()[0] * jax.device_count()

  def _iterator(self, num_epochs):
    c = self.config
    return pipeline.make_sft_iterator(
        self.source, batch_size=c.batch_size // jax.process_count(), seq_len=c.sft_data.seq_len, seed=c.seed,
        shuffle=c.sft_data.shuffle, num_epochs=num_epochs, process_index=jax.process_index(),
        process_count=jax.process_count(), packing=c.sft_data.packing)

  def _count_batches(self) -> int:
    return sum(1 for _ in self._iterator(self.config.num_epochs))

  def data_iterator(self):
    return self._iterator(None if self.config.num_steps > 0 else self.config.num_epochs)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k], np.int32))
            for k in pipeline.BATCH_KEYS}

  def bind(self, lay) -> None:
    """Receives the state layout (graphdef and shardings) from the loop before the first step."""
    step = make_train_step(lay.graphdef, self.tx, self.lr_schedule, self.config.grad_accum)
    self._step = jax.jit(step, in_shardings=(lay.shardings, self.batch_sharding),
                         out_shardings=(lay.shardings, None), donate_argnums=(0,))

  def step(self, state: TrainState, batch: dict[str, np.ndarray]):
    with jax.set_mesh(self.mesh):
      new_state, metrics = self._step(state, self.global_batch(batch))
    tokens = int(np.asarray(batch["segment_ids"] > 0).sum()) * jax.process_count()
    metrics = dict(metrics)
    metrics["seq_tokens"] = tokens
    return new_state, metrics

