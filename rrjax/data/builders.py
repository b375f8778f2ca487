"""TFDS builder `rrjax_sft`: tokenized SFT examples written as ArrayRecord, read back without TensorFlow.

`build_sft(data_dir, {"train": [SFTSource(...)]})` reads the released files (rrjax.data.sft), tokenizes
them with the response-only loss mask, and writes `data_dir/rrjax_sft/1.0.0/*.array_record-*`.
`load_source(data_dir, split)` returns the random-access `builder.as_data_source` that
rrjax.data.pipeline feeds to grain. Examples keep their file order (`disable_shuffling`); the grain
pipeline does the seeded shuffle. Text features come back as bytes (TFDS without TensorFlow).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from rrjax import tokenizer as tokenizer_lib
from rrjax.data import sft

PathLike = str | os.PathLike
NAME = "rrjax_sft"
FILE_FORMAT = "array_record"


@dataclasses.dataclass(frozen=True)
class SFTSource:
  """One input file: training_data_all.jsonl (give id_query and id_doc) or an SFT JSON (give neither)."""

  path: str
  id_query: str | None = None
  id_doc: str | None = None


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  cutoff_len: int = sft.CUTOFF_LEN
  max_passage_tokens: int | None = 512
  mode: str = "reasoning"
  max_window: int = sft.MAX_WINDOW


def _features() -> tfds.features.FeaturesDict:
  seq = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)
  return tfds.features.FeaturesDict({
      "tokens": seq(),
      "loss_mask": seq(),
      "prompt_len": tfds.features.Scalar(dtype=np.int32),
      "target_len": tfds.features.Scalar(dtype=np.int32),
      "prompt": tfds.features.Text(),
      "target": tfds.features.Text(),
      "metadata": tfds.features.Text(),  # JSON: source file:line, qid, lists, ...
  })


class RrjaxSft(tfds.core.GeneratorBasedBuilder):
  """Tokenized ReasonRank SFT examples (tokens, loss_mask and the texts they came from)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "tokens, loss_mask (response tokens incl. <|im_end|>\\n), texts, metadata."}

  def __init__(self, *, splits: Mapping[str, Sequence[SFTSource | sft.SFTExample]] | None = None,
               tokenizer=None, settings: BuildSettings = BuildSettings(), **kwargs):
    self._splits = dict(splits or {})
    self._tokenizer = tokenizer
    self._settings = settings
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs `importlib_resources` for builders inside a package; it is not installed.
    return epath.Path(__file__)

  # TFDS announces every build as a download ("Downloading and preparing dataset Unknown size ..."); these
  # files are local, so say what happens in the project's words instead.
  def _log_download_bytes(self) -> None:
    print(f"rrjax: tokenizing the SFT files into {self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) because this builder lives outside a registered TFDS package.
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(), disable_shuffling=True,
                                 homepage="https://github.com/8421BCD/ReasonRank")

  def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    if not self._splits:
      raise ValueError(f"{NAME}: nothing to build; pass splits={{'train': [SFTSource(...)]}}")
    return {name: self._generate_examples(items) for name, items in self._splits.items()}

  def _examples(self, items) -> Iterator[sft.SFTExample]:
    s = self._settings
    for item in items:
      if isinstance(item, sft.SFTExample):
        yield item
      elif item.id_query is not None or item.id_doc is not None:
        yield from sft.read_examples(item.path, id_query=item.id_query, id_doc=item.id_doc,
                                     tokenizer=self._tokenizer, max_passage_tokens=s.max_passage_tokens,
                                     mode=s.mode, max_window=s.max_window)
      else:
        yield from sft.read_sft_json(item.path, tokenizer=self._tokenizer)

  def _generate_examples(self, items) -> Iterator[tuple[int, dict[str, Any]]]:
    self._tokenizer = tokenizer_lib.or_bundled(self._tokenizer)
    for key, example in enumerate(self._examples(items)):
      yield key, to_features(example, self._tokenizer, self._settings.cutoff_len)


def to_features(example: sft.SFTExample, tokenizer, cutoff_len: int = sft.CUTOFF_LEN) -> dict[str, Any]:
  """The stored record of one example."""
  tok = sft.tokenize_example(example, tokenizer, cutoff_len)
  return {"tokens": tok["tokens"], "loss_mask": tok["loss_mask"], "prompt_len": tok["prompt_len"],
          "target_len": tok["target_len"], "prompt": example.prompt, "target": example.target,
          "metadata": json.dumps(dict(example.metadata), ensure_ascii=False, sort_keys=True)}


def build_sft(data_dir: PathLike, splits: Mapping[str, Sequence[SFTSource | sft.SFTExample]], *, tokenizer=None,
              settings: BuildSettings = BuildSettings(), overwrite: bool = False) -> RrjaxSft:
  """Writes the splits as ArrayRecord under data_dir (reusing an existing build unless overwrite)."""
  tfds.display_progress_bar(False)  # keep stderr for errors: a failed build must end in one line
  builder = RrjaxSft(data_dir=os.fspath(data_dir), splits=splits, tokenizer=tokenizer, settings=settings)
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode)
                               if mode else None)
  return builder


def load_source(data_dir: PathLike, split: str = "train"):
  """The random-access ArrayRecord source of one split (items: dicts of numpy arrays and bytes)."""
  builder = RrjaxSft(data_dir=os.fspath(data_dir))
  if not builder.data_path.exists():
    raise ValueError(f"{data_dir}: no prepared {NAME} dataset (expected {builder.data_path}); run build_sft first")
  if split not in builder.info.splits:
    raise ValueError(f"{builder.data_path}: no split {split!r} (have {', '.join(sorted(builder.info.splits))})")
  return builder.as_data_source(split=split)

