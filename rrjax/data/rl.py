"""ReasonRank RL rows (GRPO prompts with what the reward needs), in upstream's verl layout.

Upstream's RL data (hub dataset liuwenhan/reasonrank_data_rl, "organized based on the training data
format of the VERL framework"; verl's `default_compute_score` for data_source "ranking" reads
`extra_info['initial_list'|'final_list'|'relevant_docids']` and `ground_truth`, see 8421BCD/ReasonRank
verl/verl/utils/reward_score/__init__.py) has, per row, the columns

  prompt            [{"role": "system", ...}, {"role": "user", ...}]  (the chat messages of one window)
  label             "[20] > [1] > ..."  (the gold ranking: final_list as 1-based positions in initial_list)
  initial_list, final_list, relevant_docids   lists of docid strings
  dataset           e.g. "msmarco"
  data_source       "ranking"          ability  "ranking"
  reward_model      {"ground_truth": <label>, "style": "rule"}
  extra_info        {"final_list", "index", "initial_list", "relevant_docids", "split"}

`RLRow` maps them as: prompt = the chat template of `prompt` with the generation prompt and nothing else
(what verl's RLHFDataset feeds the model: no ftfy); gold_ranking = reward_model.ground_truth
(else label); the lists from the top level (else extra_info); data_source/dataset/index/split as is.
rrjax adds `qid` to extra_info. Writers emit all of the above; readers also take a flat row
`{prompt: str, gold_ranking, initial_list, final_list, relevant_docids, ...}`. Parquet needs pyarrow
(imported only by the parquet functions). Errors name `file:line` (jsonl) or `file:row i` (parquet,
0-based) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ftfy

from rrjax import tokenizer as tokenizer_lib
from rrjax.data.sft import ranking_answer, read_id_table, read_training_jsonl
from rrjax.data.trec import TrecFormatError
from rrjax.fileio import atomic_open, atomic_path
from rrjax.ranking.prompt import build_messages

PathLike = str | os.PathLike
DATA_SOURCE = "ranking"
ABILITY = "ranking"


@dataclasses.dataclass(frozen=True)
class RLRow:
  """One GRPO prompt (a window of at most 20 passages) and its reward inputs."""

  prompt: str                          # model input text, exactly rrjax.ranking.build_prompt
  gold_ranking: str                    # "[3] > [1] > ..."
  initial_list: tuple[str, ...]
  final_list: tuple[str, ...]
  relevant_docids: tuple[str, ...]
  data_source: str = DATA_SOURCE
  dataset: str = ""
  qid: str = ""
  index: int = 0
  split: str = "train"
  messages: tuple[tuple[str, str], ...] = ()  # (role, content) the prompt renders from; parquet needs it
  where: str = dataclasses.field(default="", compare=False)  # "file:line" (or "file:row i") it was read from


def render_prompt(messages: Iterable[Mapping[str, str]], tokenizer) -> str:
  """The chat template with the generation prompt, as verl 0.4's RLHFDataset applies it to a parquet row's
  messages (no ftfy: verl applies none)."""
  return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)


def rl_rows_from_training_jsonl(path: PathLike, id_query: PathLike, id_doc: PathLike, *, tokenizer=None,
                                max_passage_tokens: int | None = 512, split: str = "train",
                                data_source: str = DATA_SOURCE) -> list[RLRow]:
  """One RLRow per training_data_all.jsonl row (each row is one window), validated by the SFT reader."""
  tokenizer = tokenizer_lib.or_bundled(tokenizer)
  queries, docs = read_id_table(id_query, "query"), read_id_table(id_doc, "doc")
  rows = []
  for index, ex in enumerate(read_training_jsonl(path, id_query, id_doc, tokenizer=tokenizer,
                                                 max_passage_tokens=max_passage_tokens)):
    meta = ex.metadata
    initial, final = tuple(meta["initial_list"]), tuple(meta["final_list"])
    # The prompt is build_prompt's (ftfy over the whole, as upstream builds it); the stored messages are fixed
    # the same way, so the parquet they go to renders (by the chat template alone) to the same text.
    messages = [dict(m, content=ftfy.fix_text(m["content"])) for m in build_messages(
        queries[meta["qid"]], [docs[d] for d in initial], tokenizer, max_passage_tokens=max_passage_tokens)]
    rows.append(RLRow(prompt=ex.prompt, gold_ranking=ranking_answer(initial, final), initial_list=initial,
                      final_list=final, relevant_docids=tuple(meta["relevant_docids"]), data_source=data_source,
                      dataset=meta["dataset"], qid=meta["qid"], index=index, split=split,
                      messages=tuple((m["role"], m["content"]) for m in messages)))
  return rows


# ---------------------------------------------------------------- writers


def to_record(row: RLRow) -> dict[str, Any]:
  """The verl/upstream record of a row (prompt as messages when the row has them, else as text)."""
  lists = {"initial_list": list(row.initial_list), "final_list": list(row.final_list),
           "relevant_docids": list(row.relevant_docids)}
  prompt = [{"role": r, "content": c} for r, c in row.messages] if row.messages else row.prompt
  return {"prompt": prompt, "label": row.gold_ranking, **lists, "dataset": row.dataset,
          "data_source": row.data_source, "ability": ABILITY,
          "reward_model": {"ground_truth": row.gold_ranking, "style": "rule"},
          "extra_info": {"final_list": lists["final_list"], "index": row.index, "initial_list": lists["initial_list"],
                         "qid": row.qid, "relevant_docids": lists["relevant_docids"], "split": row.split}}


def write_rl_jsonl(path: PathLike, rows: Iterable[RLRow]) -> None:
  with atomic_open(path) as f:
    for row in rows:
      f.write(json.dumps(to_record(row), ensure_ascii=False) + "\n")


def _schema():
  import pyarrow as pa
  strings = pa.list_(pa.string())
  return pa.schema([
      ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
      ("label", pa.string()), ("initial_list", strings), ("final_list", strings), ("relevant_docids", strings),
      ("dataset", pa.string()), ("data_source", pa.string()), ("ability", pa.string()),
      ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
      ("extra_info", pa.struct([("final_list", strings), ("index", pa.int64()), ("initial_list", strings),
                                ("qid", pa.string()), ("relevant_docids", strings), ("split", pa.string())])),
  ])


def write_rl_parquet(path: PathLike, rows: Iterable[RLRow]) -> None:
  """Upstream's columns (see the module docstring); written to a temp file, then renamed."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  records = []
  for row in rows:
    if not row.messages:
      raise ValueError(f"RL row {row.index} (qid {row.qid!r}) has no chat messages; parquet's prompt column holds them")
    records.append(to_record(row))
  table = pa.Table.from_pylist(records, schema=_schema())
  with atomic_path(path) as tmp:
    pq.write_table(table, tmp)


def write_rl(path: PathLike, rows: Iterable[RLRow]) -> None:
  """Parquet for `.parquet` paths, jsonl otherwise."""
  (write_rl_parquet if str(path).endswith(".parquet") else write_rl_jsonl)(path, rows)


# ---------------------------------------------------------------- readers

_DIGITS = re.compile(r"\d+")


def _ids(path, where, value, name, required=True) -> tuple[str, ...] | None:
  if value is None:
    if required:
      raise TrecFormatError(path, where, f"field {name!r}: missing")
    return None
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(x, (str, int)) and not isinstance(x, bool) for x in value):
    raise TrecFormatError(path, where, f"field {name!r}: expected a list of docid strings")
  value = tuple(str(x) for x in value)
  if len(set(value)) != len(value):
    raise TrecFormatError(path, where, f"field {name!r}: duplicate docid")
  return value


def _get(record, extra, name):
  return record[name] if record.get(name) is not None else extra.get(name)


def from_record(record: Any, path: PathLike, where, tokenizer) -> RLRow:
  """Validates one record (verl or flat) into an RLRow; errors name path:where and the field."""
  if not isinstance(record, dict):
    raise TrecFormatError(path, where, f"expected a JSON object, got {type(record).__name__}")
  extra = record.get("extra_info") or {}
  if not isinstance(extra, dict):
    raise TrecFormatError(path, where, "field 'extra_info': not an object")
  prompt, messages = record.get("prompt"), ()
  if isinstance(prompt, list):
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                             for m in prompt):
      raise TrecFormatError(path, where, "field 'prompt': expected a non-empty list of {role, content} strings")
    messages = tuple((m["role"], m["content"]) for m in prompt)
    prompt = render_prompt(prompt, tokenizer_lib.or_bundled(tokenizer))
  elif not isinstance(prompt, str) or not prompt:
    raise TrecFormatError(path, where, "field 'prompt': missing, or neither chat messages nor a string")
  reward = record.get("reward_model") or {}
  if not isinstance(reward, dict):
    raise TrecFormatError(path, where, "field 'reward_model': not an object")
  if reward.get("ground_truth") is not None:
    gold, gold_field = reward["ground_truth"], "reward_model.ground_truth"
  else:
    gold_field = "label" if record.get("label") is not None else "gold_ranking"
    gold = record.get(gold_field)
  if not isinstance(gold, str):
    raise TrecFormatError(path, where, "field 'reward_model.ground_truth' (or 'label'/'gold_ranking'): missing or not a string")
  initial = _ids(path, where, _get(record, extra, "initial_list"), "initial_list")
  final = _ids(path, where, _get(record, extra, "final_list"), "final_list")
  relevant = _ids(path, where, _get(record, extra, "relevant_docids"), "relevant_docids")
  if not initial:
    raise TrecFormatError(path, where, "field 'initial_list': empty")
  for name, ids in (("final_list", final), ("relevant_docids", relevant)):
    stray = next((d for d in ids if d not in set(initial)), None)
    if stray is not None:
      raise TrecFormatError(path, where, f"field {name!r}: docid {stray!r} is not in initial_list")
  ids = _DIGITS.findall(gold)
  if not ids or len(set(ids)) != len(ids) or not all(1 <= int(x) <= len(initial) for x in ids):
    raise TrecFormatError(path, where, f"field {gold_field!r}: expected distinct ids [1..{len(initial)}] like "
                          f"'[2] > [1]', got {gold[:80]!r}")
  meta = {}
  for name, kind in (("data_source", str), ("dataset", str), ("qid", (str, int)), ("split", str), ("index", int)):
    value = _get(record, extra, name)
    if value is not None:
      if not isinstance(value, kind) or isinstance(value, bool):
        raise TrecFormatError(path, where, f"field {name!r}: wrong type {type(value).__name__}")
      meta[name] = str(value) if name == "qid" else value
  return RLRow(prompt=prompt, gold_ranking=gold, initial_list=initial, final_list=final, relevant_docids=relevant,
               messages=messages, where=f"{path}:{where}", **meta)


def read_rl_jsonl(path: PathLike, *, tokenizer=None) -> Iterator[RLRow]:
  """RL rows from jsonl, lazily; bad JSON or a bad field raises a one-line `file:line` error."""
  from rrjax.data.trec import json_lines
  for n, record in json_lines(path):
    yield from_record(record, path, n, tokenizer)


def read_rl_parquet(path: PathLike, *, tokenizer=None) -> list[RLRow]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  if not Path(path).exists():
    raise TrecFormatError(path, None, "no such file")
  try:
    records = pq.read_table(path).to_pylist()
  except (pa.ArrowException, OSError) as e:
    raise TrecFormatError(path, None, f"cannot read parquet: {e}") from None
  return [from_record(r, path, f"row {i}", tokenizer) for i, r in enumerate(records)]


def read_rl(path: PathLike, *, tokenizer=None) -> list[RLRow]:
  """Parquet for `.parquet` paths, jsonl otherwise."""
  if str(path).endswith(".parquet"):
    return read_rl_parquet(path, tokenizer=tokenizer)
  return list(read_rl_jsonl(path, tokenizer=tokenizer))


def reward_inputs(rows: Sequence[RLRow]) -> tuple[list[str], list[list[str]], list[list[str]]]:
  """(gold_rankings, initial_lists, relevant_docids) for rrjax.ranking.reward.batch_rewards."""
  return ([r.gold_ranking for r in rows], [list(r.initial_list) for r in rows], [list(r.relevant_docids) for r in rows])
