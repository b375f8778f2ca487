"""BM25 first stages with the `bm25s` library: an index over a corpus, saved and loaded, and top-k runs.

Tokens are bm25s's (lowercased regex matches, English stopwords removed, no stemming by default); scores are
bm25s's (Lucene's BM25 with k1 1.5, b 0.75 by default). `Index.search` returns a TREC run ({qid: {docid:
score}}, documents without a query term left out, as Lucene does); `Index.scores` all documents' scores for
one query (the demo ranks each query's own pool with it). An index directory holds bm25s's files plus
`rrjax_bm25.json` (the settings and the document ids) and is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from rrjax import fileio

META = "rrjax_bm25.json"
DEFAULT_TOKENS = r"(?u)\b\w\w+\b"  # bm25s's (and scikit-learn's) default: words of two characters or more


@dataclasses.dataclass(frozen=True)
class BM25Config:
  k1: float = 1.5
  b: float = 0.75
  method: str = "lucene"        # bm25s's variants: robertson, lucene, atire, bm25l, bm25+
  stopwords: str | None = "en"  # a bm25s stopword list name, or None
  token_pattern: str = DEFAULT_TOKENS


def _query_tokens(config: BM25Config, texts: Sequence[str], progress: bool) -> list[list[str]]:
  import bm25s
  return bm25s.tokenize(list(texts), token_pattern=config.token_pattern, stopwords=config.stopwords or [],
                        return_ids=False, show_progress=progress)


class Index:
  """A bm25s retriever and the document id of each of its rows."""

  def __init__(self, retriever, docids: Sequence[str], config: BM25Config, sources: Sequence[str] = ()):
    self.retriever, self.docids, self.config, self.sources = retriever, list(docids), config, list(sources)

  @classmethod
  def build(cls, documents: Iterable[tuple[str, str]], config: BM25Config = BM25Config(), *,
            progress: bool = False, sources: Sequence[str] = ()) -> Index:
    """Indexes (docid, text) pairs, streamed: only the token ids of each document are kept."""
    import bm25s

    docids: list[str] = []

    def texts():
      for docid, text in documents:
        docids.append(docid)
        yield text

    tokens = bm25s.tokenize(texts(), token_pattern=config.token_pattern, stopwords=config.stopwords or [],
                            show_progress=progress)  # a generator: the texts are not kept
    if not docids:
      raise ValueError("the corpus has no documents")
    retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    retriever.index(tokens, show_progress=progress)
    return cls(retriever, docids, config, sources)

  def save(self, path: str | os.PathLike) -> Path:
    with fileio.atomic_dir(path) as tmp:
      self.retriever.save(str(tmp), show_progress=False)
      meta = {"config": dataclasses.asdict(self.config), "sources": self.sources, "docids": self.docids}
      (tmp / META).write_text(json.dumps(meta))
    return Path(path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Index:
    import bm25s

    meta_path = Path(path) / META
    if not meta_path.is_file():
      raise ValueError(f"{path}: not an rrjax BM25 index (no {META})")
    meta = json.loads(meta_path.read_text())
    retriever = bm25s.BM25.load(str(path), show_progress=False)
    return cls(retriever, meta["docids"], BM25Config(**meta["config"]), meta.get("sources", ()))

  def scores(self, query: str) -> np.ndarray:
    """Every document's score for `query`, in index order (float32, as bm25s computes them)."""
    tokens = _query_tokens(self.config, [query], progress=False)[0]
    known = [t for t in tokens if t in self.retriever.vocab_dict]
    if not known:
      return np.zeros(len(self.docids), np.float32)
    return self.retriever.get_scores(known)

  def search(self, queries: Mapping[str, str], k: int = 100, *, progress: bool = False
             ) -> dict[str, dict[str, float]]:
    """{qid: {docid: score}} of each query's top k (fewer when fewer documents share a term with it)."""
    qids = list(queries)
    tokens = _query_tokens(self.config, [queries[q] for q in qids], progress)
    k = min(k, len(self.docids))
    rows, scores = self.retriever.retrieve(tokens, k=k, sorted=True, show_progress=progress,
                                           backend_selection="numpy", n_threads=0)
    return {qid: {self.docids[int(i)]: float(s) for i, s in zip(rows[j], scores[j]) if s > 0}
            for j, qid in enumerate(qids)}
