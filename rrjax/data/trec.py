"""Strict readers and atomic writers for TREC runs, qrels, topics and corpora.

Every reader raises `TrecFormatError` (a ValueError) whose message is one line naming `file:line`,
so CLIs can print it and exit non-zero without a traceback. Files ending in `.gz` are gunzipped.
Runs and qrels come back as `{qid: {docid: value}}` in file order (the shape pytrec_eval takes).
With `skip_malformed=True` run/qrels readers skip bad lines instead (ReasonRank drops the 12
BRIGHT stackoverflow run lines whose docids contain spaces) and report the count in `.skipped`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from typing import Any, Collection, Iterable, Iterator, Mapping

from rrjax.fileio import atomic_open
from rrjax.ranking.prompt import CONTENT_FIELDS

PathLike = str | os.PathLike

ID_FIELDS = ("docid", "_id", "id")
QUERY_ID_FIELDS = ("id", "qid", "_id", "query_id")
QUERY_TEXT_FIELDS = ("query", "text", "contents")
# A document's text: upstream's prompt precedence, then BRIGHT's column name.
TEXT_FIELDS = CONTENT_FIELDS + ("content",)


class TrecFormatError(ValueError):
  """A malformed input file; str() is a single line `file:line: what`."""

  def __init__(self, path: PathLike, line: int | None, what: str):
    self.path, self.line, self.what = str(path), line, what
    where = f"{path}:{line}" if line is not None else f"{path}"
    super().__init__(f"{where}: {' '.join(str(what).split())}")


class TrecDict(dict):
  """A dict that also remembers how many malformed lines the reader skipped."""
  skipped: int = 0


def open_text(path: PathLike) -> io.TextIOBase:
  if not os.path.exists(path):
    raise TrecFormatError(path, None, "no such file")
  if str(path).endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", newline="")
  return open(path, "rt", encoding="utf-8", newline="")


def numbered_lines(path: PathLike) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its newline); decoding errors name the line.

  Lines are split on bytes and decoded one at a time, so a bad byte is blamed on its own line.
  """
  if not os.path.exists(path):
    raise TrecFormatError(path, None, "no such file")
  n = 0
  try:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise TrecFormatError(path, n, f"not UTF-8 ({e.reason} at byte {e.start})") from None
        yield n, line.rstrip("\r\n")
  except (OSError, EOFError) as e:
    raise TrecFormatError(path, n + 1 if n else None, f"cannot read: {e}") from None


def _number(kind: type, text: str, name: str, what: str):
  """`kind(text)`, or a ValueError in our words (not Python's "invalid literal for int() with base 10")."""
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"{name} {text!r} is not {what}") from None


def read_run(path: PathLike, skip_malformed: bool = False) -> TrecDict:
  """`qid Q0 docid rank score tag` -> {qid: {docid: score}}; rank is ignored, as trec_eval does."""
  run = TrecDict()
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    fields = line.split()
    try:
      if len(fields) != 6:
        raise ValueError(f"expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}")
      qid, _, docid, rank, score, _ = fields
      _number(int, rank, "rank", "an integer")
      value = _number(float, score, "score", "a number")
      if math.isnan(value):
        raise ValueError("score is NaN")
      docs = run.setdefault(qid, {})
      if docid in docs:
        raise ValueError(f"duplicate docid {docid!r} for query {qid!r}")
      docs[docid] = value
    except ValueError as e:
      if not skip_malformed:
        raise TrecFormatError(path, n, str(e)) from None
      run.skipped += 1
  return run


def read_qrels(path: PathLike, skip_malformed: bool = False) -> TrecDict:
  """`qid iter docid rel` -> {qid: {docid: rel}} (rel an int; the iter column is ignored)."""
  qrels = TrecDict()
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    fields = line.split()
    try:
      if len(fields) != 4:
        raise ValueError(f"expected 4 fields 'qid iter docid rel', got {len(fields)}")
      qid, _, docid, rel = fields
      docs = qrels.setdefault(qid, {})
      if docid in docs:
        raise ValueError(f"duplicate judgment of {docid!r} for query {qid!r}")
      docs[docid] = _number(int, rel, "relevance grade", "an integer")
    except ValueError as e:
      if not skip_malformed:
        raise TrecFormatError(path, n, str(e)) from None
      qrels.skipped += 1
  return qrels


def json_lines(path: PathLike) -> Iterator[tuple[int, dict]]:
  """(line number, object) of a jsonl file (gz accepted); blank lines skipped, errors name file:line."""
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise TrecFormatError(path, n, f"bad JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
      raise TrecFormatError(path, n, f"expected a JSON object, got {type(obj).__name__}")
    yield n, obj


def _field(path: PathLike, n: int, obj: Mapping[str, Any], names: Iterable[str], what: str) -> str:
  for name in names:
    if name in obj and obj[name] is not None:
      return str(obj[name])
  raise TrecFormatError(path, n, f"no {what} field (one of {', '.join(names)})")


def _is_jsonl(path: PathLike) -> bool:
  name = str(path).removesuffix(".gz")
  return name.endswith((".jsonl", ".json"))


def read_topics(path: PathLike) -> dict[str, str]:
  """Topics as {qid: query}: tsv `qid<TAB>query`, or jsonl with `id`/`query` (BRIGHT, BEIR)."""
  topics: dict[str, str] = {}
  if _is_jsonl(path):
    rows = ((n, _field(path, n, o, QUERY_ID_FIELDS, "query id"),
             _field(path, n, o, QUERY_TEXT_FIELDS, "query text")) for n, o in json_lines(path))
  else:
    rows = _tsv_topics(path)
  for n, qid, query in rows:
    if qid in topics:
      raise TrecFormatError(path, n, f"duplicate query id {qid!r}")
    topics[qid] = query
  return topics


def _tsv_topics(path: PathLike) -> Iterator[tuple[int, str, str]]:
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    qid, tab, query = line.partition("\t")
    if not tab or not qid.strip():
      raise TrecFormatError(path, n, "expected 'qid<TAB>query'")
    yield n, qid.strip(), query


def iter_corpus(path: PathLike, wanted: Collection[str] | None = None) -> Iterator[tuple[int, str, dict[str, str]]]:
  """(line, docid, {"text", ["title"]}) of a jsonl corpus, streamed; with `wanted`, only those documents."""
  for n, obj in json_lines(path):
    docid = _field(path, n, obj, ID_FIELDS, "document id")
    if wanted is not None and docid not in wanted:
      continue
    doc = {"text": _field(path, n, obj, TEXT_FIELDS, "text")}
    if obj.get("title"):
      doc["title"] = str(obj["title"])
    yield n, docid, doc


def read_corpus(path: PathLike, wanted: Collection[str] | None = None) -> dict[str, dict[str, str]]:
  """jsonl corpus -> {docid: {"text": ..., "title": ...}} ("title" only when present); with `wanted`, only
  those documents are kept (the file is streamed). rrjax.data.corpus reads the other published layouts.

  The id is the first of docid/_id/id; the text the first non-null of TEXT_FIELDS (upstream's precedence,
  then BRIGHT's `content`), so `titled_content(corpus[docid])` gives upstream's passage string.
  """
  corpus: dict[str, dict[str, str]] = {}
  for n, docid, doc in iter_corpus(path, wanted):
    if docid in corpus:
      raise TrecFormatError(path, n, f"duplicate document id {docid!r}")
    corpus[docid] = doc
  return corpus


def read_rankgpt(path: PathLike) -> tuple[dict[str, str], dict[str, dict[str, float]], dict[str, dict[str, str]]]:
  """RankGPT json `[{query, hits: [{content, qid, docid, rank, score}]}]` -> (topics, run, corpus).

  The run keeps the hits' order; errors name the file and the hit (`query i hit j`).
  """
  try:
    with open_text(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise TrecFormatError(path, e.lineno, f"bad JSON: {e.msg}") from None
  except UnicodeDecodeError as e:
    raise TrecFormatError(path, None, f"not UTF-8 ({e.reason})") from None
  if not isinstance(data, list):
    raise TrecFormatError(path, None, "expected a JSON list of {query, hits}")
  topics: dict[str, str] = {}
  run: dict[str, dict[str, float]] = {}
  corpus: dict[str, dict[str, str]] = {}
  for i, entry in enumerate(data):
    try:
      query, hits = entry["query"], entry["hits"]
      for j, hit in enumerate(hits):
        where = f"query {i} hit {j}"
        try:
          qid, docid = str(hit["qid"]), str(hit["docid"])
          score, content = float(hit["score"]), str(hit["content"])
        except (KeyError, TypeError, ValueError) as e:
          raise TrecFormatError(path, None, f"{where}: bad hit ({type(e).__name__}: {e})") from None
        topics.setdefault(qid, str(query))
        docs = run.setdefault(qid, {})
        if docid in docs:
          raise TrecFormatError(path, None, f"{where}: duplicate docid {docid!r}")
        docs[docid] = score
        corpus.setdefault(docid, {"text": content})
    except (KeyError, TypeError) as e:
      raise TrecFormatError(path, None, f"query {i}: expected {{query, hits}} ({e})") from None
  return topics, run, corpus


def ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
  """trec_eval's order: score descending, ties broken by docid descending."""
  return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def write_run(path: PathLike, run: Mapping[str, Mapping[str, float]], tag: str = "rrjax",
              sort: bool = True) -> None:
  """Write `qid Q0 docid rank score tag` lines atomically.

  Scores are written with repr() (lossless), not upstream's `%.6f`, so no new ties appear. With
  sort=True each query is written in trec_eval's order, so the rank column agrees with evaluation.
  """
  if not tag or any(c.isspace() for c in tag):
    raise ValueError(f"tag must be non-empty without whitespace: {tag!r}")
  with atomic_open(path) as f:
    for qid, docs in run.items():
      items = ranked(docs) if sort else list(docs.items())
      for rank, (docid, score) in enumerate(items, 1):
        if any(c.isspace() for c in f"{qid}{docid}") or not qid or not docid:
          raise ValueError(f"query/doc ids must be non-empty without whitespace: {qid!r} {docid!r}")
        f.write(f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n")


def write_qrels(path: PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
  """Write `qid 0 docid rel` lines atomically."""
  with atomic_open(path) as f:
    for qid, docs in qrels.items():
      for docid, rel in docs.items():
        f.write(f"{qid} 0 {docid} {int(rel)}\n")


def write_topics(path: PathLike, topics: Mapping[str, str]) -> None:
  """Write `qid<TAB>query` lines atomically (tabs and line breaks in queries become spaces)."""
  with atomic_open(path) as f:
    for qid, query in topics.items():
      f.write(f"{qid}\t{query.translate(_FLATTEN)}\n")


_FLATTEN = str.maketrans({"\t": " ", "\n": " ", "\r": " "})
