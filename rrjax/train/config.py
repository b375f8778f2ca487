"""Frozen settings for training. gin fills them at the entry point (rrjax/train/__main__.py); the library
only ever sees these dataclasses."""

from __future__ import annotations

import dataclasses

from rrjax.model.lora import LoraConfig
from rrjax.model.qwen2 import Qwen2Config
from rrjax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup then cosine decay to `final_lr_ratio * lr`, and global-norm clipping."""

  lr: float = 5e-6
  warmup_ratio: float = 0.1
  schedule: str = "cosine"  # cosine | constant
  final_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  """ReasonRank SFT data: training_data_all.jsonl (+ id_query/, id_doc/) or LLaMA-Factory SFT JSON."""

  train_files: tuple[str, ...] = ()
  id_query: str | None = None
  id_doc: str | None = None
  max_passage_tokens: int = 512
  cutoff_len: int = 23552
  seq_len: int = 23552
  # False: one example per row, padded to seq_len. True ('rows'): batch_size rows, filled first-fit (the
  # number of examples per step varies). 'samples': batch_size examples per step (LLaMA-Factory's count),
  # packed into as few rows as hold them, whole micro-batches; the step compiles once per row count. Each
  # sample keeps the loss weight of the device it was drawn for (TrainConfig.loss_norm).
  packing: bool | str = True
  shuffle: bool = True
  data_dir: str | None = None  # where the TFDS ArrayRecord build goes; default <run_dir>/data


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Upstream's recipe by default: 8 rollouts per prompt, 2 updates per step, clip 0.2, dual clip 3,
  low-variance KL at 0.001, temperature 1, 3072 response tokens, prompts up to 20,480 tokens.

  Each step: rollouts, then one no-gradient pass (in micro-batches) for the old log-probs (the actor's,
  recomputed before any update) and the reference's, then `updates_per_step` updates, each a scan over
  micro-batches of `micro_batch_size` sequences per device accumulating loss sums and gradients.

  loss_agg (how per-token losses, the KL term included, become the loss of a mini-batch):
    'seq_mean_token_mean': each sequence's token mean, averaged over the sequences. What ReasonRank ran:
      verl 0.4's 'token-mean' inside micro-batches of one sequence per GPU, scaled by 1 / accumulation
      steps and averaged over GPUs.
    'token_mean': one token mean over the whole mini-batch (long responses weigh more).
  """

  rollouts_per_prompt: int = 8
  updates_per_step: int = 2
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_response_tokens: int = 3072
  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.2
  dual_clip: float = 3.0
  kl_coef: float = 0.001
  loss_agg: str = "seq_mean_token_mean"  # or 'token_mean'; see above
  micro_batch_size: int = 1  # sequences per device per micro-step (update and no-gradient pass)
  # Longest prompt (tokens) a row may have; longer rows are refused where they are read (verl's
  # truncation='error'). The programs are compiled for this length, so it decides the memory a run needs.
  max_prompt_tokens: int = 20480
  overlong_prompts: str = "error"  # 'error': refuse the row (file:line); 'drop': skip it and count it (verl's
  #   filter_overlong_prompts, which ReasonRank's recipe turns on)
  # Mini-batches as verl forms them: rollouts reordered so each data shard holds about the same number of
  # tokens (verl's balance_batch, Karmarkar-Karp over prompt+response lengths), each shard's sequences then
  # split into the updates in order. False: contiguous slices of the rollouts.
  balance_batch: bool = True
  # A non-finite gradient norm skips that update (verl: zero_grad, no optimizer step; the schedule advances);
  # this many skipped in a row stop the run, naming the last good checkpoint.
  max_consecutive_skips: int = 3
  rollout_batch_size: int | None = None  # rows per generate call (None: all rollouts at once)
  # What the learning-rate schedule counts. 'rollout_step' (verl 0.4.0): the scheduler steps once per rollout
  # step, after all of its updates (fsdp_workers.py:594), so a step's updates share one lr; the schedule spans
  # the run's rollout steps and its warmup is int(warmup_ratio x steps) (fsdp_workers.py:359). 'update': one
  # schedule step per optimizer update over steps x updates_per_step, warmup rounded up (HF's rule, as SFT).
  schedule_unit: str = "rollout_step"


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
  """RL rows (jsonl or parquet, upstream's verl layout; see rrjax.data.rl)."""

  train_files: tuple[str, ...] = ()
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. `num_steps` <= 0 means `num_epochs` passes over the data."""

  run_dir: str = "runs/default"
  trainer: str = "sft"  # sft | grpo
  model: Qwen2Config = dataclasses.field(default_factory=Qwen2Config.tiny)
  init_from: str | None = None  # an HF directory or an rrjax run/checkpoint; None = random init
  tokenizer: str | None = None  # a directory with tokenizer.json; default: init_from's, else Qwen2.5's
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  lora: LoraConfig = LoraConfig()
  sft_data: SFTDataConfig = SFTDataConfig()
  grpo: GRPOConfig = GRPOConfig()
  rl_data: RLDataConfig = RLDataConfig()
  batch_size: int = 8  # global sequences (SFT) or prompts (GRPO) per optimizer step
  grad_accum: int = 1
  # Positions of each sequence whose [chunk, vocab] logits exist at once in the loss (and GRPO's log-probs);
  # 0 = the whole sequence at once (the reference path: same values, [T, V] float32 in memory).
  loss_chunk_tokens: int = 1024
  # SFT loss normalisation. 'per_device_token_mean': each device's samples (its grad_accum micro-batches; with
  # packing, the samples the data pipeline assigned to its group, wherever their rows lie) are normalised by their
  # own label count, then the devices averaged: HF Trainer 4.52 under DeepSpeed, what LLaMA-Factory ran for
  # ReasonRank (rrjax/train/UPSTREAM.md). 'global_token_mean': one token mean over the global batch.
  loss_norm: str = "global_token_mean"
  preflight: bool = True  # compile every program before the first step; write preflight.json
  num_steps: int = 0
  num_epochs: int = 1
  seed: int = 0
  log_every: int = 1
  export_hf: bool = True
  export_dtype: str | None = None
