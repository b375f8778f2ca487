"""`python -m rrjax.retrieve`: BM25 runs that match bm25s's own scores, a saved index that is reused, and the
demo task's first stage on bm25s."""

from __future__ import annotations

import numpy as np
import pytest

from bright_fixtures import write_jsonl
from rrjax import retrieve
from rrjax.data import bm25, trec
from rrjax.data.bm25 import BM25Config, Index

WORDS = "apple river stone light quantum garden engine paper cloud music silver forest window ocean".split()


def _corpus(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return {f"doc{i}": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for i in range(n)}


QUERIES = {"q1": "apple river", "q2": "quantum engine of the forest", "q3": "the and of", "q4": "ocean music silver"}


def _bm25s_reference(docs, queries, k):
  """What bm25s's README does: tokenize (English stopwords), index, retrieve."""
  import bm25s

  ids = list(docs)
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize([docs[d] for d in ids], stopwords="en", show_progress=False), show_progress=False)
  out = {}
  for qid, text in queries.items():
    tokens = bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]
    scores = retriever.get_scores(tokens) if tokens else np.zeros(len(ids))
    top = np.argsort(-scores, kind="stable")[:k]
    out[qid] = {ids[i]: float(scores[i]) for i in top if scores[i] > 0}
  return out


def test_run_matches_bm25s_and_the_index_is_reused(tmp_path, capsys, monkeypatch):
  docs = _corpus()
  write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d, "text": t} for d, t in docs.items()])
  trec.write_topics(tmp_path / "topics.tsv", QUERIES)
  argv = ["--corpus", str(tmp_path / "corpus.jsonl"), "--queries", str(tmp_path / "topics.tsv"),
          "--out", str(tmp_path / "run.trec"), "--k", "10", "--index", str(tmp_path / "index"), "--no-progress"]
  assert retrieve.main(argv) == 0
  run = trec.read_run(tmp_path / "run.trec")
  want = _bm25s_reference(docs, QUERIES, 10)
  assert "q3" not in run and want["q3"] == {}  # stopwords only: no document shares a term
  assert set(run) == {"q1", "q2", "q4"}
  for qid in run:
    assert set(run[qid]) == set(want[qid]) and len(run[qid]) == min(10, len(want[qid]))
    assert run[qid] == pytest.approx(want[qid], rel=1e-6)
  assert "(1 queries share no term" in capsys.readouterr().err
  # The saved index is loaded, not rebuilt, and gives the same run; other settings are refused.
  monkeypatch.setattr(Index, "build", classmethod(lambda *a, **k: pytest.fail("rebuilt the index")))
  assert retrieve.main(argv[:4] + ["--out", str(tmp_path / "again.trec")] + argv[6:]) == 0
  assert trec.read_run(tmp_path / "again.trec") == run
  with pytest.raises(ValueError, match=r"index: this index was built from other files or with other settings"):
    retrieve.main(argv + ["--k1", "0.9"])


def test_titles_are_indexed_and_the_demo_first_stage_is_bm25(tmp_path):
  write_jsonl(tmp_path / "c.jsonl", [{"docid": "a", "title": "zebra", "text": "apple"},
                                     {"docid": "b", "text": "apple"}])
  index = retrieve.index_for([str(tmp_path / "c.jsonl")], BM25Config(), None, progress=False)
  assert list(index.search({"q": "zebra"}, 5)["q"]) == ["a"]
  # The synthetic task's first stage: each query's pool ranked by bm25s scores over the split's passages.
  from rrjax.synth import task as task_lib
  queries = task_lib.generate(task_lib.TaskConfig(seed=3, num_train=0, num_test=20)).split("test")
  run = task_lib.first_stage_run(queries, seed=3)
  full = Index.build([(d, p) for q in queries for d, p in zip(q.docids, q.passages)],
                     BM25Config(token_pattern=task_lib.TOKENS))
  row = {d: i for i, d in enumerate(full.docids)}
  for q in queries:
    scores = full.scores(q.text)
    ranked = [d for d, _ in trec.ranked(run[q.qid])]
    assert [round(float(scores[row[d]]), 4) for d in ranked] == sorted((round(float(scores[row[d]]), 4)
                                                                        for d in q.docids), reverse=True)
  assert bm25.DEFAULT_TOKENS != task_lib.TOKENS  # digits are single characters: the task keeps them
