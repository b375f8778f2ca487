"""`python -m rrjax.retrieve --corpus C --queries Q --out RUN.trec [--k 100] [--index DIR]`: a BM25 first stage.

For datasets that come without a first-stage run (BEIR, your own): BM25 with the `bm25s` library over a corpus
in any layout rrjax reads (jsonl, MS MARCO tsv, parquet shards; a document's title, when it has one, is
indexed before its text), queries as tsv, jsonl or parquet. `--index DIR` keeps the index: a later run with the
same corpus files and settings loads it instead of indexing again. Progress bars go to stderr (--no-progress
hides them). The run is written atomically in trec_eval order; documents that share no term with a query are
left out, as Lucene does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from rrjax import cli
from rrjax.data import corpus as corpus_lib
from rrjax.data import trec
from rrjax.data.bm25 import META, BM25Config, Index


def _sources(paths: Sequence[str]) -> list[str]:
  """What identifies the indexed corpus: each file's absolute path and size."""
  out = []
  for p in paths:
    if not os.path.exists(p):
      raise trec.TrecFormatError(p, None, "no such file")
    out.append(f"{Path(p).resolve()} {os.path.getsize(p)}")
  return out


def _documents(paths: Sequence[str]):
  for docid, doc in corpus_lib.iter_documents(paths):
    yield docid, f"{doc['title']} {doc['text']}" if doc.get("title") else doc["text"]


def index_for(paths: Sequence[str], config: BM25Config, index_dir: str | None, progress: bool) -> Index:
  """The saved index in `index_dir` when it was built from these files with these settings, else a new one
  (saved there when `index_dir` is given)."""
  sources = _sources(paths)
  if index_dir and (Path(index_dir) / META).is_file():
    index = Index.load(index_dir)
    if index.config != config or index.sources != sources:
      raise ValueError(f"{index_dir}: this index was built from other files or with other settings "
                       f"({index.config}); use another --index or delete it")
    return index
  index = Index.build(_documents(paths), config, progress=progress, sources=sources)
  if index_dir:
    index.save(index_dir)
  return index


def build_parser() -> argparse.ArgumentParser:
  d = BM25Config()
  ap = argparse.ArgumentParser(prog="python -m rrjax.retrieve", description=__doc__.splitlines()[0])
  ap.add_argument("--corpus", action="append", required=True, help="document file(s): jsonl, tsv or parquet")
  ap.add_argument("--queries", required=True, help="topics: tsv `qid<TAB>query`, jsonl or parquet")
  ap.add_argument("--out", required=True, help="the TREC run to write")
  ap.add_argument("--k", type=int, default=100, help="documents per query (default 100)")
  ap.add_argument("--index", help="a folder to keep the BM25 index in (loaded when it matches)")
  ap.add_argument("--k1", type=float, default=d.k1)
  ap.add_argument("--b", type=float, default=d.b)
  ap.add_argument("--method", default=d.method, help="bm25s variant: robertson, lucene, atire, bm25l, bm25+")
  ap.add_argument("--stopwords", default=d.stopwords, help="a bm25s stopword list ('en'), or 'none'")
  ap.add_argument("--token-pattern", default=d.token_pattern, help="the regex whose matches are the tokens")
  ap.add_argument("--tag", default="bm25s", help="the run's tag column")
  ap.add_argument("--no-progress", action="store_true", help="no progress bars")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.k < 1:
    raise ValueError(f"--k must be positive, got {args.k}")
  config = BM25Config(k1=args.k1, b=args.b, method=args.method, token_pattern=args.token_pattern,
                      stopwords=None if str(args.stopwords).lower() == "none" else args.stopwords)
  queries = corpus_lib.read_queries(args.queries)
  if not queries:
    raise ValueError(f"{args.queries}: no queries")
  index = index_for(args.corpus, config, args.index, progress=not args.no_progress)
  run = index.search(queries, args.k, progress=not args.no_progress)
  trec.write_run(args.out, {q: docs for q, docs in run.items() if docs}, tag=args.tag)
  empty = sum(1 for docs in run.values() if not docs)
  print(f"rrjax.retrieve: {len(index.docids)} documents, {len(queries)} queries, top {args.k} -> {args.out}"
        + (f" ({empty} queries share no term with any document)" if empty else "")
        + (f"; index in {args.index}" if args.index else ""), file=sys.stderr)
  return 0


def console() -> None:
  """The `rrjax-retrieve` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.retrieve")

