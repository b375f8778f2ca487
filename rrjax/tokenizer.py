"""Qwen2.5 and Qwen3 tokenizers and chat templates, without transformers.

`load()` returns the bundled tokenizer of a model family (model_type "qwen2": Qwen2.5's, "qwen3": Qwen3's; see
the PROVENANCE.md beside each); a checkpoint directory that has its own tokenizer.json wins. The chat template
is rendered with jinja2 the way transformers renders it (trim_blocks, lstrip_blocks, `tojson`,
`raise_exception`).

Qwen3's vocabulary is Qwen2.5's plus `<tool_response>`, `</tool_response>`, `<think>` (151667) and `</think>`
(151668). None of the four is special, so decoding with special tokens skipped keeps them (as vLLM's default
detokenisation does): the parser reads a Qwen3 model's own `<think>`. Neither ends generation (`stop_ids`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import tokenizers

ASSET_DIR = Path(__file__).parent / "assets" / "qwen2.5-tokenizer"
QWEN3_ASSET_DIR = Path(__file__).parent / "assets" / "qwen3-tokenizer"
BUNDLED = {"qwen2": ASSET_DIR, "qwen3": QWEN3_ASSET_DIR}  # model_type -> the bundled tokenizer directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


class TokenizerError(ValueError):
  pass


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` plus the fields of tokenizer_config.json that generation needs."""

  backend: tokenizers.Tokenizer
  config: dict
  source_dir: Path

  @property
  def chat_template(self) -> str:
    return self.config["chat_template"]

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  @property
  def eos_token(self) -> str:
    return self.config.get("eos_token") or "<|im_end|>"

  @property
  def eos_token_id(self) -> int:
    return self.token_to_id(self.eos_token)

  @property
  def pad_token_id(self) -> int:
    return self.token_to_id(self.config.get("pad_token") or "<|endoftext|>")

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generation: the chat end-of-turn token and the end-of-text token (never `</think>`: the
    answer follows it)."""
    ids = {self.eos_token_id, self.token_to_id("<|endoftext|>")}
    return tuple(sorted(i for i in ids if i is not None))

  @property
  def think_ids(self) -> tuple[int, int] | None:
    """(`<think>`, `</think>`) where each is one token of the vocabulary (Qwen3: 151667, 151668), else None
    (Qwen2.5 spells them out in ordinary tokens)."""
    ids = self.token_to_id("<think>"), self.token_to_id("</think>")
    return None if None in ids else ids

  def __len__(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def tokenize(self, text: str) -> list[str]:
    """Token strings (byte-level form), like transformers' `tokenizer.tokenize`."""
    return self.backend.encode(text, add_special_tokens=False).tokens

  def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
    ids = [self.backend.token_to_id(t) for t in tokens]
    if any(i is None for i in ids):
      raise TokenizerError(f"unknown token in {list(tokens)[:5]}...")
    return self.backend.decode(ids, skip_special_tokens=False)

  def apply_chat_template(
      self,
      messages: Sequence[dict[str, Any]],
      *,
      add_generation_prompt: bool = True,
      tokenize: bool = False,
      **kwargs,
  ) -> str | list[int]:
    text = _compile_template(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs)
    return self.encode(text) if tokenize else text

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
      src = self.source_dir / name
      if src.exists():
        (path / name).write_bytes(src.read_bytes())


def or_bundled(tokenizer=None):
  """`tokenizer`, or the bundled Qwen2.5 tokenizer when it is None (where a tokenizer argument is optional)."""
  return load() if tokenizer is None else tokenizer


def load(path: str | os.PathLike | None = None, *, model_type: str = "qwen2") -> Tokenizer:
  """The tokenizer of a checkpoint directory when it has tokenizer.json, else the bundled one of `model_type`
  (a Qwen2Config's: "qwen2" or "qwen3")."""
  if model_type not in BUNDLED:
    raise TokenizerError(f"model_type {model_type!r} has no bundled tokenizer; choose one of {sorted(BUNDLED)}")
  directory = BUNDLED[model_type]
  if path is not None and (Path(path) / "tokenizer.json").exists():
    directory = Path(path)
  return _load_dir(str(directory), model_type)


@functools.lru_cache(maxsize=8)
def _load_dir(directory: str, model_type: str = "qwen2") -> Tokenizer:
  """A tokenizer directory; without a chat template of its own it takes its family's bundled one."""
  directory = Path(directory)
  try:
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    raise TokenizerError(f"{directory / 'tokenizer.json'}: cannot load tokenizer: {e}") from None
  config_path = directory / "tokenizer_config.json"
  config = {}
  if config_path.exists():
    try:
      config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise TokenizerError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None
  if "chat_template" not in config:
    bundled = json.loads((BUNDLED[model_type] / "tokenizer_config.json").read_text())
    config = {**config, "chat_template": bundled["chat_template"]}
  return Tokenizer(backend=backend, config=config, source_dir=directory)


def train_small(texts: Sequence[str], out_dir: str | os.PathLike, *, vocab_size: int = 1024) -> Tokenizer:
  """A small byte-level BPE tokenizer in Qwen2.5's layout (same pre-tokenizer regex, special tokens and
  chat template), trained on `texts`. The embedded demo and tests use it so that a tiny model's output
  layer is not 150k wide; a real Qwen2.5 checkpoint always brings its own tokenizer.json."""
  from tokenizers import decoders, models, pre_tokenizers, trainers

  qwen = json.loads((ASSET_DIR / "tokenizer.json").read_text())
  config = json.loads((ASSET_DIR / "tokenizer_config.json").read_text())
  specials = [t["content"] for t in sorted(qwen["added_tokens"], key=lambda t: t["id"])]
  backend = tokenizers.Tokenizer(models.BPE())
  backend.normalizer = tokenizers.normalizers.NFC()
  split = qwen["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  backend.save(str(out / "tokenizer.json"))
  small_config = {k: v for k, v in config.items() if k != "added_tokens_decoder"}
  small_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  (out / "tokenizer_config.json").write_text(json.dumps(small_config, indent=2, ensure_ascii=False))
  _load_dir.cache_clear()
  return load(out)
