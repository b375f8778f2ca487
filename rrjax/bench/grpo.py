"""GRPO step cost: rollout tokens/s and update time per step, on a random model.

    python -m rrjax.bench.grpo [--preset tiny] [--layers N] [--prompts 4] [--rollouts 8]
                               [--prompt-len 256] [--response 64] [--steps 2]

Rollouts are timed alone (rrjax.generate with every row decoding the full budget) and inside a whole
GRPO step (generate + reward + 2 updates), so update time = step time - rollout time. The limit printed
is the memory-bandwidth bound of decoding (weights + KV read once per decode step). The upstream peer
(verl + vLLM) needs GPUs and is not runnable here.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from rrjax import decode, hardware, sharding
from rrjax.engine import config as engine_config
from rrjax import tokenizer as tokenizer_lib
from rrjax.data.rl import RLRow
from rrjax.model.qwen2 import KVCache, Qwen2, Qwen2Config
from rrjax.train import grpo
from rrjax.train import state as state_lib
from rrjax.train.config import GRPOConfig, OptimizerConfig, TrainConfig


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m rrjax.bench.grpo")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--rollouts", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=256)
  p.add_argument("--response", type=int, default=64)
  p.add_argument("--steps", type=int, default=2)
  args = p.parse_args(argv)

  dtype = hardware.default_dtype()
  overrides = {"num_layers": args.layers} if args.layers else {}
  model_cfg = Qwen2Config.preset(args.preset, param_dtype="float32", dtype=dtype, **overrides)
  g = GRPOConfig(rollouts_per_prompt=args.rollouts, max_response_tokens=args.response, kl_coef=0.001)
  config = TrainConfig(trainer="grpo", model=model_cfg, batch_size=args.prompts, num_steps=args.steps + 1, grpo=g,
                       optimizer=OptimizerConfig(lr=1e-6, warmup_ratio=0.0, schedule="constant"))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
  tok = tokenizer_lib.load()
  text = " ".join(["passage"] * (args.prompt_len - 1))
  rows = [RLRow(prompt=f"{i} {text}", gold_ranking="[1] > [2]", initial_list=("a", "b"), final_list=("a", "b"),
                relevant_docids=("a",), qid=str(i)) for i in range(args.prompts * (args.steps + 1))]
  trainer = grpo.GRPOTrainer(config, mesh, model_cfg, tok, rows=rows)
  lay = state_lib.layout(lambda: Qwen2(model_cfg, rngs=nnx.Rngs(0)), trainer.tx, mesh)
  trainer.bind(lay)
  state = state_lib.init_state(sharding.create_sharded(lambda: Qwen2(model_cfg, rngs=nnx.Rngs(0)), mesh),
                               trainer.tx, lay, 0)
  it = trainer.data_iterator()

  prompts = [tok.encode(r.prompt) for r in rows[:args.prompts] for _ in range(args.rollouts)]

  def rollout():
    model = nnx.merge(lay.graphdef, state.params, state.frozen)
    t = time.perf_counter()
    out = decode.generate(model, prompts, max_new_tokens=args.response, min_new_tokens=args.response,
                          temperature=1.0, stop_ids=(), mesh=mesh)
    return time.perf_counter() - t, sum(out.lengths)

  rollout()  # compile
  t_gen, n_gen = min(rollout() for _ in range(2))
  state, _ = trainer.step(state, next(it))  # compile the update
  step_times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = trainer.step(state, next(it))
    step_times.append(time.perf_counter() - t)
  t_step = float(np.median(step_times))

  c = model_cfg
  batch = args.prompts * args.rollouts
  weight_bytes = c.param_count() * 4
  kv = KVCache.nbytes(c, batch, 1, engine_config.default_cache_dtype(c)) * (args.prompt_len + args.response / 2)
  bw, bw_source = hardware.peak_bandwidth()
  bound = batch * bw / (weight_bytes + kv)
  result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "model": c.name,
            "layers": c.num_layers, "rollouts": batch, "prompt_len": args.prompt_len, "response": args.response,
            "rollout_tokens_per_s": n_gen / t_gen, "rollout_seconds": t_gen,
            "grpo_step_seconds": t_step, "update_seconds_per_step": max(t_step - t_gen, 0.0),
            "decode_bandwidth_bound_tokens_per_s": bound, "bandwidth": bw, "bandwidth_source": bw_source,
            "peer": "verl + vLLM (needs GPUs; not run)"}
  print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in result.items()}, indent=2))
  return result


if __name__ == "__main__":
  main()
