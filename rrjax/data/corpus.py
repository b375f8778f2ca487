"""Documents, queries and qrels in the layouts benchmarks are published in, read the way a rerank needs them.

- Documents: jsonl (`docid`/`_id`/`id` and a text field, e.g. BEIR's corpus.jsonl), tsv `pid<TAB>passage` (MS
  MARCO's collection.tsv), or parquet (BRIGHT's documents/ shards with id/content; any id and text column
  named as in jsonl). They are streamed: with `wanted`, only those ids are kept, so reranking a run over MS
  MARCO's 8.8M passages holds only the run's top-k (parquet is read one record batch at a time).
- Queries: tsv or jsonl (rrjax.data.trec.read_topics), or parquet (BRIGHT's examples/: id, query).
- Qrels: TREC `qid iter docid rel`, BEIR's tsv (`query-id<TAB>corpus-id<TAB>score`, with its header), or a
  parquet of examples with a list column (BRIGHT's `gold_ids`, relevance 1).
Errors are `TrecFormatError`s naming the file and the line (text files) or the row (parquet, 0-based).
No reader touches the network.
"""

from __future__ import annotations

import os
from typing import Any, Collection, Iterable, Iterator, Sequence

from rrjax.data import trec
from rrjax.data.trec import ID_FIELDS, QUERY_ID_FIELDS, QUERY_TEXT_FIELDS, TEXT_FIELDS, TrecFormatError

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]
BATCH_ROWS = 4096  # parquet rows decoded at a time
BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")
NOT_AVAILABLE = "N/A"  # BRIGHT's placeholder in empty id lists


def _paths(paths: Paths) -> list[PathLike]:
  return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _kind(path: PathLike) -> str:
  name = str(path).lower().removesuffix(".gz")
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith((".tsv", ".txt", ".tab")):
    return "tsv"
  return "jsonl"


# ---------------------------------------------------------------- parquet


def _parquet(path: PathLike):
  import pyarrow.parquet as pq

  if not os.path.exists(path):
    raise TrecFormatError(path, None, "no such file")
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses for damaged files
    raise TrecFormatError(path, None, f"not a readable parquet file ({type(e).__name__}: {e})") from None


def _column(path: PathLike, names: Sequence[str], candidates: Iterable[str], what: str, required: bool = True):
  for name in candidates:
    if name in names:
      return name
  if required:
    raise TrecFormatError(path, None, f"no {what} column (one of {', '.join(candidates)}); columns: "
                          f"{', '.join(names)}")
  return None


def _batches(path: PathLike, columns: Sequence[str]) -> Iterator[tuple[int, Any]]:
  """(index of the batch's first row, record batch) over the file, errors naming the file."""
  pf = _parquet(path)
  start = 0
  try:
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
      yield start, batch
      start += batch.num_rows
  except TrecFormatError:
    raise
  except Exception as e:
    raise TrecFormatError(path, None, f"row {start}+: cannot read ({type(e).__name__}: {e})") from None


def _null_row(path: PathLike, start: int, column, what: str) -> None:
  if column.null_count:
    import pyarrow.compute as pc
    row = start + int(pc.index(pc.is_null(column), True).as_py())
    raise TrecFormatError(path, None, f"row {row}: {what} is null")


def _parquet_documents(path: PathLike, wanted: Collection[str] | None) -> Iterator[tuple[str, str, dict]]:
  import numpy as np
  import pyarrow as pa
  import pyarrow.compute as pc

  names = _parquet(path).schema_arrow.names
  id_col = _column(path, names, ID_FIELDS, "document id")
  text_col = _column(path, names, TEXT_FIELDS, "text")
  title_col = _column(path, names, ("title",), "title", required=False)
  columns = [c for c in (id_col, text_col, title_col) if c]
  value_set = pa.array(sorted(wanted), pa.string()) if wanted is not None else None
  for start, batch in _batches(path, columns):
    ids = batch.column(id_col)
    _null_row(path, start, ids, "the document id")
    ids = ids.cast(pa.string())
    rows = np.arange(batch.num_rows)
    if value_set is not None:  # only the wanted rows become Python objects
      mask = pc.is_in(ids, value_set=value_set)
      rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
      if not len(rows):
        continue
      batch, ids = batch.take(pa.array(rows)), ids.take(pa.array(rows))
    texts = batch.column(text_col).to_pylist()
    titles = batch.column(title_col).to_pylist() if title_col else [None] * len(texts)
    for row, docid, text, title in zip(rows.tolist(), ids.to_pylist(), texts, titles):
      if text is None:
        raise TrecFormatError(path, None, f"row {start + row}: document {docid!r} has a null {text_col!r}")
      doc = {"text": str(text)}
      if title:
        doc["title"] = str(title)
      yield f"row {start + row}", docid, doc


def _list_column_rows(path: PathLike, field: str) -> Iterator[tuple[int, str, list[str]]]:
  """(row, query id, ids) of a parquet of examples with a list column (BRIGHT's gold_ids, excluded_ids)."""
  names = _parquet(path).schema_arrow.names
  id_col = _column(path, names, QUERY_ID_FIELDS, "query id")
  _column(path, names, (field,), field)
  for start, batch in _batches(path, (id_col, field)):
    qids, lists = batch.column(id_col), batch.column(field)
    _null_row(path, start, qids, "the query id")
    for i, (qid, ids) in enumerate(zip(qids.to_pylist(), lists.to_pylist())):
      if ids is None:
        ids = []
      if isinstance(ids, str) or not all(isinstance(d, str) for d in ids):
        raise TrecFormatError(path, None, f"row {start + i}: {field!r} must be a list of strings")
      yield start + i, str(qid), [d for d in ids if d != NOT_AVAILABLE]


# ---------------------------------------------------------------- documents


def _tsv_documents(path: PathLike, wanted: Collection[str] | None) -> Iterator[tuple[str, str, dict]]:
  for n, line in trec.numbered_lines(path):
    if not line.strip():
      continue
    docid, tab, text = line.partition("\t")
    if not tab or not docid.strip():
      raise TrecFormatError(path, n, "expected 'docid<TAB>text'")
    docid = docid.strip()
    if wanted is None or docid in wanted:
      yield f"line {n}", docid, {"text": text}


def iter_documents(paths: Paths, wanted: Collection[str] | None = None) -> Iterator[tuple[str, dict]]:
  """(docid, {"text", ["title"]}) of every document in `paths` (only `wanted` ones when given), in file order;
  a document id that appears twice is an error naming both places."""
  seen: dict[str, str] = {}
  for path in _paths(paths):
    kind = _kind(path)
    if kind == "parquet":
      rows = _parquet_documents(path, wanted)
    elif kind == "tsv":
      rows = _tsv_documents(path, wanted)
    else:
      rows = ((f"line {n}", d, doc) for n, d, doc in trec.iter_corpus(path, wanted))
    for where, docid, doc in rows:
      if docid in seen:
        raise TrecFormatError(path, None, f"{where}: duplicate document id {docid!r} (first at {seen[docid]})")
      seen[docid] = f"{path} {where}"
      yield docid, doc


def read_documents(paths: Paths, wanted: Collection[str] | None = None) -> dict[str, dict[str, str]]:
  """{docid: {"text", ["title"]}} of `paths` (see iter_documents)."""
  return dict(iter_documents(paths, wanted))


# ---------------------------------------------------------------- queries and qrels


def read_queries(paths: Paths) -> dict[str, str]:
  """{qid: query} from tsv/jsonl topics or a parquet of examples (id, query)."""
  topics: dict[str, str] = {}
  for path in _paths(paths):
    if _kind(path) != "parquet":
      part = trec.read_topics(path)
      rows = [(None, q, t) for q, t in part.items()]
    else:
      names = _parquet(path).schema_arrow.names
      id_col = _column(path, names, QUERY_ID_FIELDS, "query id")
      text_col = _column(path, names, QUERY_TEXT_FIELDS, "query text")
      rows = []
      for start, batch in _batches(path, (id_col, text_col)):
        _null_row(path, start, batch.column(id_col), "the query id")
        _null_row(path, start, batch.column(text_col), "the query text")
        rows += [(f"row {start + i}", str(q), str(t)) for i, (q, t) in
                 enumerate(zip(batch.column(id_col).to_pylist(), batch.column(text_col).to_pylist()))]
    for where, qid, text in rows:
      if qid in topics:
        raise TrecFormatError(path, None, f"{where + ': ' if where else ''}duplicate query id {qid!r}")
      topics[qid] = text
  return topics


def _is_beir_qrels(path: PathLike) -> bool:
  for _, line in trec.numbered_lines(path):
    if line.strip():
      return tuple(line.strip().split("\t")) == BEIR_QRELS_HEADER
  return False


def _beir_qrels(path: PathLike) -> trec.TrecDict:
  qrels = trec.TrecDict()
  header = True
  for n, line in trec.numbered_lines(path):
    if not line.strip():
      continue
    if header:  # the header line, checked by _is_beir_qrels
      header = False
      continue
    fields = line.split("\t")
    if len(fields) != 3:
      raise TrecFormatError(path, n, f"expected 3 tab-separated fields 'query-id corpus-id score', got {len(fields)}")
    qid, docid, score = (f.strip() for f in fields)
    try:
      rel = int(score)
    except ValueError:
      raise TrecFormatError(path, n, f"score {score!r} is not an integer") from None
    docs = qrels.setdefault(qid, {})
    if docid in docs:
      raise TrecFormatError(path, n, f"duplicate judgment of {docid!r} for query {qid!r}")
    docs[docid] = rel
  return qrels


def read_qrels(paths: Paths, field: str = "gold_ids") -> dict[str, dict[str, int]]:
  """{qid: {docid: rel}} from TREC qrels, BEIR qrels tsv, or a parquet of examples (`field`, relevance 1; a query
  whose list is empty or "N/A" is left out, as it would be from a TREC qrels file)."""
  qrels: dict[str, dict[str, int]] = {}
  for path in _paths(paths):
    if _kind(path) == "parquet":
      part = {}
      for row, qid, ids in _list_column_rows(path, field):
        if qid in part:
          raise TrecFormatError(path, None, f"row {row}: duplicate query id {qid!r}")
        if ids:  # a query without judgments has no qrels lines, as in a TREC qrels file
          part[qid] = dict.fromkeys(ids, 1)
    elif _is_beir_qrels(path):
      part = _beir_qrels(path)
    else:
      part = trec.read_qrels(path)
    for qid, docs in part.items():
      if qid in qrels:
        raise TrecFormatError(path, None, f"query {qid!r} is judged in an earlier qrels file too")
      qrels[qid] = docs
  return qrels


def read_id_lists(paths: Paths, field: str) -> dict[str, list[str]]:
  """{qid: ids} of a list column of parquet examples (e.g. BRIGHT's `excluded_ids`; "N/A" dropped)."""
  return {qid: ids for path in _paths(paths) for _, qid, ids in _list_column_rows(path, field)}
