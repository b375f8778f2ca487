"""Small SFT data, a small tokenizer and a tiny model config for training tests."""

import json
from pathlib import Path

from rrjax import tokenizer as tokenizer_lib
from rrjax.model.qwen2 import Qwen2Config

SYSTEM = "You rank."


def sft_rows(n: int = 8):
  rows = []
  for i in range(n):
    a, b = (3 * i + 1) % 10, (7 * i + 2) % 10
    rows.append({"system": SYSTEM, "instruction": f"Passages: [1] cost {a}. [2] cost {b}. Which costs less?",
                 "output": f"<think>{a} vs {b}.</think> <answer>[{1 if a <= b else 2}] > [{2 if a <= b else 1}]</answer>"})
  return rows


def write_sft(path: Path, n: int = 8) -> Path:
  path.write_text(json.dumps(sft_rows(n)))
  return path


def small_tokenizer(directory: Path):
  tok = tokenizer_lib.load()
  texts = []
  for row in sft_rows(32):
    msgs = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]}]
    texts.append(tok.apply_chat_template(msgs, add_generation_prompt=False))
  return tokenizer_lib.train_small(texts * 4, directory, vocab_size=400)


def tiny_config(**kw) -> Qwen2Config:
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, tie_word_embeddings=True, name="tiny-test")
  return Qwen2Config(**{**base, **kw})


def gin_params(run_dir: Path, data: Path, tok_dir: Path, **extra) -> list[str]:
  params = {
      "TrainConfig.run_dir": repr(str(run_dir)),
      "TrainConfig.tokenizer": repr(str(tok_dir)),
      "SFTDataConfig.train_files": f"({str(data)!r},)",
      "SFTDataConfig.seq_len": "128",
      "SFTDataConfig.cutoff_len": "128",
      "model_preset.vocab_size": "512",
      **{k: str(v) for k, v in extra.items()},
  }
  return [f"{k} = {v}" for k, v in params.items()]
