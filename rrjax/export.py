"""python -m rrjax.export --checkpoint RUN_OR_STEP_DIR --out HF_DIR [--dtype bfloat16]

Converts an rrjax (Orbax) training checkpoint into a Hugging Face directory (LoRA merged), which
transformers' AutoModelForCausalLM loads with the same logits. The output appears atomically.
"""

from __future__ import annotations

import argparse

from rrjax import cli


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rrjax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or one step dir")
  parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
  parser.add_argument("--dtype", default=None, help="tensor dtype in the export (default: the parameters')")
  args = parser.parse_args(argv)

  from rrjax import checkpoints, tokenizer
  from rrjax.model import hf

  model = checkpoints.from_pretrained(args.checkpoint)
  tok = tokenizer.load(checkpoints.run_dir_of(args.checkpoint))
  out = hf.save_pretrained(model, args.out, dtype=args.dtype, tokenizer=tok)
  print(f"exported {args.checkpoint} ({model.config.param_count() / 1e6:.1f}M parameters) to {out}")
  return 0


def console() -> None:
  """The `rrjax-export` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.export")
