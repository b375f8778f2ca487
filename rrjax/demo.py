"""The README's main job, grown as capabilities land.

Today: build a tiny random Qwen2.5-architecture model (or load --model), build a real ReasonRank listwise
prompt with the bundled Qwen2.5 tokenizer, run the model over it, decode greedily with the compiled
KV-cache decoder and parse the completion with upstream's parser, export the model to Hugging Face format,
reload the export (with rrjax, and with transformers when it is installed) and show that the logits agree.
A random model ranks nothing: this proves the plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

QUERY = "which metal is liquid at room temperature [and why]?"
PASSAGES = [
    {"title": "Gallium", "text": "Gallium melts at 29.76 °C, just above room temperature."},
    "Mercury is the only metal that is liquid at standard conditions; its 6s electrons are held tightly "
    "(relativistic contraction), so metallic bonding is weak.",
    {"text": "Iron melts at 1538 &deg;C and is solid at room temperature."},
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rrjax.demo", description=__doc__)
  parser.add_argument("--model", help="a Hugging Face Qwen2 directory (default: a tiny random model)")
  parser.add_argument("--out", default="runs/demo", help="where the exported HF directory goes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--new-tokens", type=int, default=24)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import rrjax
  from rrjax import ranking, tokenizer as tokenizer_lib
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  t0 = time.time()
  if args.model:
    model = rrjax.from_pretrained(args.model)
    tok = tokenizer_lib.load(args.model)
  else:
    model = Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(args.seed))
    tok = tokenizer_lib.load()
  config = model.config
  print(f"model: {config.name}: {config.param_count() / 1e6:.1f}M parameters, {config.num_layers} layers, "
        f"{jax.device_count()} {jax.default_backend()} device(s)")

  prompt = ranking.build_prompt(QUERY, PASSAGES, tok, max_passage_tokens=512)
  ids = tok.encode(prompt)
  print(f"ReasonRank prompt: {len(PASSAGES)} passages, {len(ids)} tokens; it ends with:")
  print("  " + prompt[-160:].replace("\n", "\n  "))
  logits = np.asarray(jax.jit(lambda g, s, x: nnx.merge(g, s)(x))(*nnx.split(model), jnp.asarray([ids])))
  top = int(logits[0, -1].argmax())
  print(f"next token after the prompt: {top} {tok.decode([top])!r}")
  generation = rrjax.generate(model, [ids], max_new_tokens=args.new_tokens, stop_ids=tok.stop_ids)
  assert generation.tokens[0][0] == top, "the decoder's first greedy token differs from the forward pass"
  completion = tok.decode(generation.tokens[0])
  perm, source = ranking.parse_permutation_with_source(completion, len(PASSAGES))
  print(f"greedy completion ({generation.lengths[0]} tokens, {generation.finish_reasons[0]}): {completion[:80]!r}")
  print(f"parsed ranking ({source}): " + " > ".join(f"[{i + 1}]" for i in perm))

  out = Path(args.out) / "hf"
  rrjax.save_pretrained(model, out, tokenizer=tok)
  files = sorted(p.name for p in out.iterdir())
  print(f"exported to {out}: {', '.join(files)}")

  reloaded = rrjax.from_pretrained(out, dtype=config.param_dtype)
  again = np.asarray(reloaded(jnp.asarray([ids])))
  report = {"prompt_tokens": len(ids), "rrjax_reload_max_abs_diff": float(np.abs(again - logits).max())}
  try:
    import torch
    import transformers
  except ImportError:
    print("transformers is not installed: compared with the rrjax reload only")
  else:
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
      theirs = ref(torch.tensor([ids])).logits.numpy()
    report["transformers_max_abs_diff"] = float(np.abs(theirs - logits).max())
  report["seconds"] = round(time.time() - t0, 1)
  print(json.dumps(report, indent=2))
  worst = max(v for k, v in report.items() if k.endswith("diff"))
  tolerance = 1e-4 if config.dtype == "float32" else 5e-2
  print("logits agree" if worst <= tolerance else f"LOGITS DIFFER by {worst}")
  return 0 if worst <= tolerance else 1


if __name__ == "__main__":
  from rrjax import cli

  cli.run(main, prog="rrjax.demo")
