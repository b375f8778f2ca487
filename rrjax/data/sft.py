"""ReasonRank SFT data: released formats -> (prompt, target) text -> tokens with a response-only loss mask.

Two sources, both yielding `SFTExample`s:
- `read_training_jsonl`: rows `{dataset, qid, initial_list, final_list, reasoning, relevant_docids}` of
  training_data_all.jsonl, with the query and passage texts looked up in id_query/ and id_doc/. The
  prompt is `rrjax.ranking.build_prompt` over the initial_list passages in that order. The target is
  our layout (upstream's exact whitespace lives only in the hub's SFT JSON):
  `<think>{reasoning.strip()}</think> <answer>[i] > [j] > ...</answer>`, with i, j the 1-based
  positions of the final_list docids within initial_list.
- `read_sft_json`: LLaMA-Factory alpaca rows `{system, instruction, [input], output}` (a JSON list or
  jsonl; `input` is ignored, as ReasonRank's dataset_info makes LLaMA-Factory do). The prompt is the Qwen
  chat template of system + instruction with the generation prompt
  (LLaMA-Factory's `qwen` template renders the same text; no ftfy, since LLaMA-Factory applies none);
  the target is `output` exactly.

id_query/ and id_doc/ layouts are not documented upstream, so `read_id_table` accepts a file or a
directory of files (`.json`, `.jsonl`, optionally `.gz`), each either jsonl/list records
`{"id"|"qid"|"docid"|"_id": ..., "text"|"query"|"contents"|...: ...}` or one JSON dict `{id: text}`
(a dict value may be a record with `title`/`text`, as in corpora).

`tokenize_example` mirrors LLaMA-Factory's supervised processor with the `qwen` template
(hiyouga/LLaMA-Factory src/llamafactory/data/processor/supervised.py, data/template.py): source =
the prompt tokens, target = tokens of `output + "<|im_end|>\n"` (the qwen `format_assistant` slot);
the loss covers the whole target, so the closing `<|im_end|>` and the "\n" after it are trained,
exactly as LLaMA-Factory does. Over-long examples are cut with LLaMA-Factory's `infer_seqlen`
(processor_utils.py): both parts keep their beginnings.

Tokens and the loss mask are aligned (loss_mask[t] == 1 iff tokens[t] is a response token), like
LLaMA-Factory's `labels == input_ids`; the loss function shifts (see pipeline.next_token_targets).
Errors are `TrecFormatError`s naming `file:line` (jsonl) or `file:[index]` (JSON list) and the field.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rrjax import tokenizer as tokenizer_lib
from rrjax.data.trec import ID_FIELDS, QUERY_ID_FIELDS, QUERY_TEXT_FIELDS, TrecFormatError
from rrjax.ranking.prompt import CONTENT_FIELDS, build_prompt

PathLike = str | os.PathLike

CUTOFF_LEN = 23552  # upstream qwen_full_sft.yaml cutoff_len
MAX_WINDOW = 20
# LLaMA-Factory `qwen` template: format_assistant = "{{content}}<|im_end|>\n".
ASSISTANT_SUFFIX = "<|im_end|>\n"
TARGET_TEMPLATE = "<think>{reasoning}</think> <answer>{ranking}</answer>"


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """One supervised example: the full prompt text, the response text, and where it came from."""

  prompt: str
  target: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def _read_text(path: Path) -> str:
  try:
    raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
  except OSError as e:
    raise TrecFormatError(path, None, f"cannot read: {e}") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise TrecFormatError(path, line, f"not UTF-8 ({e.reason})") from None


def _records(path: Path) -> Iterator[tuple[int | str, Any, bool]]:
  """(where, object, whole_file): JSON list items (`[i]`), jsonl lines, or one whole-file JSON value."""
  text = _read_text(path)
  if not text.strip():
    return
  head = text.lstrip()[:1]
  if head == "[":
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise TrecFormatError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
    yield from ((f"[{i}]", obj, False) for i, obj in enumerate(data))
    return
  try:  # a one-object file: a {id: text} table, or a single record
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg != "Extra data":
      raise TrecFormatError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
  else:
    yield text[:len(text) - len(text.lstrip())].count("\n") + 1, obj, True
    return
  for n, line in enumerate(io.StringIO(text), 1):  # lazily: id_doc files can be large
    if not line.strip():
      continue
    try:
      yield n, json.loads(line), False
    except json.JSONDecodeError as e:
      raise TrecFormatError(path, n, f"bad JSON: {e.msg} (column {e.colno})") from None


def _first(obj: Mapping[str, Any], names: Sequence[str]) -> str | None:
  return next((n for n in names if obj.get(n) is not None), None)


def read_id_table(path: PathLike, kind: str = "doc") -> dict[str, Any]:
  """id -> text (queries) or id -> passage (docs: a str, or a dict with text/title) from a file or dir."""
  if kind not in ("doc", "query"):
    raise ValueError(f"kind must be 'doc' or 'query', got {kind!r}")
  path = Path(path)
  if not path.exists():
    raise TrecFormatError(path, None, "no such file or directory")
  files = sorted(p for p in path.iterdir() if p.is_file() and p.name.removesuffix(".gz").endswith(
      (".json", ".jsonl"))) if path.is_dir() else [path]
  if not files:
    raise TrecFormatError(path, None, "no .json/.jsonl files in directory")
  id_fields = QUERY_ID_FIELDS if kind == "query" else ID_FIELDS + ("qid",)
  text_fields = QUERY_TEXT_FIELDS if kind == "query" else CONTENT_FIELDS
  table: dict[str, Any] = {}

  def add(file, where, key, value):
    value = _entry(file, where, value, text_fields, kind)
    if key in table and table[key] != value:
      raise TrecFormatError(file, where, f"id {key!r} appears twice with different text")
    table[key] = value

  for file in files:
    for where, obj, whole in _records(file):
      if not isinstance(obj, dict):
        raise TrecFormatError(file, where, f"expected a JSON object, got {type(obj).__name__}")
      id_field = _first(obj, id_fields)
      if whole and (id_field is None or _first(obj, text_fields) is None):
        for key, value in obj.items():  # {id: text}
          add(file, f"{where} (id {key!r})", str(key), value)
        continue
      if id_field is None:
        raise TrecFormatError(file, where, f"no id field (one of {', '.join(id_fields)})")
      add(file, where, str(obj[id_field]), obj)
  return table


def _entry(file, where, value, text_fields, kind):
  if isinstance(value, str):
    return value
  if not isinstance(value, dict) or _first(value, text_fields) is None:
    raise TrecFormatError(file, where, f"no text field (one of {', '.join(text_fields)})")
  if kind == "query":
    return str(value[_first(value, text_fields)])
  doc = {"text": str(value[_first(value, text_fields)])}
  if value.get("title"):
    doc["title"] = str(value["title"])
  return doc


def _str_list(path, n, row, name, *, required=True) -> list[str] | None:
  if name not in row:
    if required:
      raise TrecFormatError(path, n, f"field {name!r}: missing")
    return None
  value = row[name]
  if not isinstance(value, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value):
    raise TrecFormatError(path, n, f"field {name!r}: expected a list of docid strings")
  value = [str(x) for x in value]
  if len(set(value)) != len(value):
    dup = next(x for i, x in enumerate(value) if x in value[:i])
    raise TrecFormatError(path, n, f"field {name!r}: duplicate docid {dup!r}")
  return value


def ranking_answer(initial_list: Sequence[str], final_list: Sequence[str]) -> str:
  """`[i] > [j] > ...`: the 1-based positions in initial_list of the final_list docids."""
  position = {d: i for i, d in enumerate(initial_list, 1)}
  return " > ".join(f"[{position[d]}]" for d in final_list)


def training_target(reasoning: str, initial_list: Sequence[str], final_list: Sequence[str]) -> str:
  """Our target layout for training_data_all.jsonl rows (see the module docstring)."""
  return TARGET_TEMPLATE.format(reasoning=reasoning.strip(), ranking=ranking_answer(initial_list, final_list))


def read_training_jsonl(path: PathLike, id_query_dir: PathLike, id_doc_dir: PathLike, *, tokenizer=None,
                        max_passage_tokens: int | None = 512, mode: str = "reasoning",
                        max_window: int = MAX_WINDOW) -> Iterator[SFTExample]:
  """Yields one `SFTExample` per row of training_data_all.jsonl (lazily; errors name file:line).

  final_list may be a subset of initial_list (the answer then names fewer ids), but each docid must be
  in initial_list once. relevant_docids is optional and kept in metadata.
  """
  tokenizer = tokenizer_lib.or_bundled(tokenizer)
  queries = read_id_table(id_query_dir, "query")
  docs = read_id_table(id_doc_dir, "doc")
  path = Path(path)
  for n, row, _ in _records(path):
    if isinstance(n, str):
      raise TrecFormatError(path, None, "expected jsonl (one JSON object per line), got a JSON list")
    if not isinstance(row, dict):
      raise TrecFormatError(path, n, f"expected a JSON object, got {type(row).__name__}")
    qid = row.get("qid")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
      raise TrecFormatError(path, n, "field 'qid': missing or not a string")
    qid = str(qid)
    if qid not in queries:
      raise TrecFormatError(path, n, f"field 'qid': query id {qid!r} not found in {id_query_dir}")
    initial = _str_list(path, n, row, "initial_list")
    final = _str_list(path, n, row, "final_list")
    relevant = _str_list(path, n, row, "relevant_docids", required=False)
    if not initial:
      raise TrecFormatError(path, n, "field 'initial_list': empty")
    if len(initial) > max_window:
      raise TrecFormatError(path, n, f"field 'initial_list': {len(initial)} docids exceed the window of {max_window}")
    missing = next((d for d in initial if d not in docs), None)
    if missing is not None:
      raise TrecFormatError(path, n, f"field 'initial_list': docid {missing!r} not found in {id_doc_dir}")
    if not final:
      raise TrecFormatError(path, n, "field 'final_list': empty")
    initial_set = set(initial)
    for name, ids in (("final_list", final), ("relevant_docids", relevant or [])):
      stray = next((d for d in ids if d not in initial_set), None)
      if stray is not None:
        raise TrecFormatError(path, n, f"field {name!r}: docid {stray!r} is not in initial_list")
    reasoning = row.get("reasoning")
    if not isinstance(reasoning, str):
      raise TrecFormatError(path, n, "field 'reasoning': missing or not a string")
    dataset = row.get("dataset", "")
    if not isinstance(dataset, str):
      raise TrecFormatError(path, n, "field 'dataset': not a string")
    try:
      prompt = build_prompt(queries[qid], [docs[d] for d in initial], tokenizer,
                            max_passage_tokens=max_passage_tokens, mode=mode)
    except ValueError as e:
      raise TrecFormatError(path, n, f"cannot build the prompt: {e}") from None
    yield SFTExample(prompt=prompt, target=training_target(reasoning, initial, final), metadata={
        "source": f"{path}:{n}", "dataset": dataset, "qid": qid, "initial_list": initial,
        "final_list": final, "relevant_docids": relevant or []})


def read_sft_json(path: PathLike, *, tokenizer=None) -> Iterator[SFTExample]:
  """Yields `SFTExample`s from LLaMA-Factory alpaca rows {system, instruction, [input], output}.

  An `input` column is read (it must be a string when present) but not used: ReasonRank's dataset_info.json
  maps prompt/response/system only, so LLaMA-Factory's alpaca converter never sees it. A missing or empty
  system falls back to the template default (Qwen's own default system).
  """
  tokenizer = tokenizer_lib.or_bundled(tokenizer)
  path = Path(path)
  for where, row, _ in _records(path):
    if not isinstance(row, dict):
      raise TrecFormatError(path, where, f"expected a JSON object, got {type(row).__name__}")
    for name, required in (("instruction", True), ("output", True), ("system", False), ("input", False)):
      value = row.get(name)
      if (value is None and required) or (value is not None and not isinstance(value, str)):
        raise TrecFormatError(path, where, f"field {name!r}: missing or not a string")
    messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
    messages.append({"role": "user", "content": row["instruction"]})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    yield SFTExample(prompt=prompt, target=row["output"], metadata={"source": f"{path}:{where}"})


def read_examples(path: PathLike, *, id_query: PathLike | None = None, id_doc: PathLike | None = None,
                  tokenizer=None, **kwargs) -> Iterator[SFTExample]:
  """training_data_all.jsonl when id tables are given, else the SFT JSON."""
  if (id_query is None) != (id_doc is None):
    raise ValueError("give both id_query and id_doc (training_data_all.jsonl) or neither (SFT JSON)")
  if id_query is not None:
    return read_training_jsonl(path, id_query, id_doc, tokenizer=tokenizer, **kwargs)
  return read_sft_json(path, tokenizer=tokenizer)


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
  """LLaMA-Factory's split of `cutoff_len` between prompt and response (processor_utils.infer_seqlen)."""
  if target_len * 2 < cutoff_len:  # the response is short: cut the prompt
    max_target_len = cutoff_len
  elif source_len * 2 < cutoff_len:  # the prompt is short: cut the response
    max_target_len = cutoff_len - source_len
  else:  # both long: cut proportionally
    max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
  new_target_len = min(max_target_len, target_len)
  new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
  return new_source_len, new_target_len


def tokenize_example(example: SFTExample, tokenizer, cutoff_len: int = CUTOFF_LEN) -> dict[str, Any]:
  """tokens int32[T], loss_mask int32[T] (1 on response tokens), prompt_len, target_len, truncated."""
  if cutoff_len <= 0:
    raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
  source = tokenizer.encode(example.prompt)
  target = tokenizer.encode(example.target + ASSISTANT_SUFFIX)
  s, t = infer_seqlen(len(source), len(target), cutoff_len)
  tokens = np.asarray(source[:s] + target[:t], np.int32)
  loss_mask = np.concatenate([np.zeros(s, np.int32), np.ones(t, np.int32)])
  return {"tokens": tokens, "loss_mask": loss_mask, "prompt_len": s, "target_len": t,
          "truncated": (s, t) != (len(source), len(target))}
