"""bf16 fidelity: rrjax bf16 (each attention kernel) and transformers bf16 against one float32 reference.

    python -m rrjax.bench.fidelity [--preset 0.5b] [--layers N] [--batch 2] [--seq 64] [--attention xla,cudnn]

Random weights are rounded to bf16 first, so every model holds the same values; the reference is
transformers in float32 on them (sdpa, as from_pretrained picks), on the same device. Prints, for each
model, the max and mean |logit error| and the argmax agreement with the reference, and whether rrjax's
error is no larger than transformers'. --per-layer repeats the comparison for the first 1..L layers, to
find where an excess error enters. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m rrjax.bench.fidelity", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="0.5b")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--attention", default=None, help="comma list (default: xla, and cudnn on a GPU)")
  ap.add_argument("--per-layer", action="store_true")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from rrjax.bench import peer
  from rrjax.model import hf
  from rrjax.model.qwen2 import Qwen2Config

  kernels = args.attention.split(",") if args.attention else ["xla"] + (["cudnn"] if jax.default_backend() == "gpu"
                                                                         else [])
  overrides = {"num_layers": args.layers} if args.layers else {}
  config = Qwen2Config.preset(args.preset, **overrides)
  torch.manual_seed(0)
  ref = transformers.Qwen2ForCausalLM(peer.torch_config(config)).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  weights = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))

  def torch_logits(model, dtype, layers):
    model = model.to(device=peer.device(), dtype=dtype)
    with torch.no_grad():
      out = model(torch.tensor(tokens, device=peer.device()))
    return out.logits.float().cpu().numpy()

  def truncated(layers):
    """The first `layers` decoder layers of `ref` (the same tensors), as a model of their own."""
    model = copy.deepcopy(ref)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
      model.config.layer_types = model.config.layer_types[:layers]
    return config.replace(num_layers=layers), model

  def compare(layers):
    cfg, model = truncated(layers)
    model.config._attn_implementation = "sdpa"
    expected = torch_logits(model, torch.float32, layers)
    got = {"transformers_bf16": torch_logits(model, torch.bfloat16, layers)}
    for kernel in kernels:
      ours = hf.from_tensors(cfg.replace(param_dtype="bfloat16", dtype="bfloat16", attention=kernel),
                             lambda name, shape: weights[name])
      got[f"rrjax_bf16_{kernel}"] = np.asarray(jax.jit(lambda t: ours(t))(jnp.asarray(tokens)), np.float32)
    row = {}
    for name, x in got.items():
      err = np.abs(x - expected)
      row[name] = {"max_err": float(err.max()), "mean_err": float(err.mean()),
                   "argmax_agreement": float((x.argmax(-1) == expected.argmax(-1)).mean())}
    return row

  depths = range(1, config.num_layers + 1) if args.per_layer else [config.num_layers]
  result = {"device": jax.devices()[0].device_kind, "torch_device": peer.device(), "model": config.name,
            "layers": config.num_layers, "tokens": list(tokens.shape), "by_depth": {}}
  for depth in depths:
    row = compare(depth)
    result["by_depth"][depth] = row
    theirs = row["transformers_bf16"]["max_err"]
    verdict = ", ".join(f"{k[len('rrjax_bf16_'):]} {'<=' if v['max_err'] <= theirs else '>'} transformers"
                        for k, v in row.items() if k.startswith("rrjax"))
    print(f"{depth:3d} layers: " + "; ".join(f"{k} max {v['max_err']:.4f} mean {v['mean_err']:.5f} argmax "
                                             f"{v['argmax_agreement']:.4f}" for k, v in row.items()) + f" [{verdict}]")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.bench.fidelity")
