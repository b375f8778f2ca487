"""rrjax.data.trec: strict readers naming file:line, lenient skipping, atomic writers."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from rrjax import fileio
from rrjax.data import trec
from rrjax.ranking.prompt import titled_content

TREC = Path(__file__).parent / "data" / "trec"


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_real_files_read():
  run = trec.read_run(TREC / "dl19" / "BM25.dl19.top100.trec.gz")
  assert len(run) == 43 and all(len(d) == 100 for d in run.values()) and run.skipped == 0
  assert run["264014"]["5611210"] == pytest.approx(15.780599594116211)
  qrels = trec.read_qrels(TREC / "dl19" / "qrels.dl19-passage.txt.gz")  # "qid Q0 docid rel"
  assert len(qrels) == 43 and set().union(*map(set, (d.values() for d in qrels.values()))) == {0, 1, 2, 3}
  bright = trec.read_qrels(TREC / "bright" / "qrels.bright-biology.txt.gz")  # tab-separated
  assert bright["0"]["insects_attracted_to_light/Phototaxis_3.txt"] == 1
  topics = trec.read_topics(TREC / "dl19" / "topics.dl19-passage.txt")
  assert len(topics) == 43 and topics["264014"].startswith("how long is life cycle of flea")
  jl = trec.read_topics(TREC / "bright" / "topics.bright-biology-original.first3.jsonl.gz")
  assert list(jl) == ["0", "1", "2"] and jl["0"].startswith("Claim in article about why insects")


def test_stackoverflow_docids_with_spaces():
  path = TREC / "bright" / "stackoverflow.reasonir_gpt4cot_top20.txt.gz"
  with pytest.raises(trec.TrecFormatError, match=r"stackoverflow\.reasonir_gpt4cot_top20\.txt\.gz:\d+: expected 6"):
    trec.read_run(path)
  run = trec.read_run(path, skip_malformed=True)
  assert run.skipped == 12 and not any(" " in d for docs in run.values() for d in docs)


def test_rankgpt_excerpt():
  topics, run, corpus = trec.read_rankgpt(TREC / "dl19" / "BM25.dl19.rankgpt-excerpt.json")
  assert topics["264014"] == "how long is life cycle of flea"
  assert list(run["264014"]) == list(trec.read_run(TREC / "dl19" / "BM25.dl19.top100.trec.gz")["264014"])[:5]
  assert corpus["5611210"]["text"].startswith("5. Cancel. A flea can live up to a year")


@pytest.mark.parametrize("content,line,pattern", [
  ("q1 Q0 d1 1 1.5 t\nq1 Q0 d2 2 1.0\n", 2, "expected 6 fields"),
  ("q1 Q0 d1 1 1.5 t\n\nq1 Q0 d2 two 1.0 t\n", 3, "rank 'two' is not an integer$"),
  ("q1 Q0 d1 1 high t\n", 1, "score 'high' is not a number$"),
  ("q1 Q0 d1 1 1.5 t\nq1 Q0 d1 2 1.0 t\n", 2, "duplicate docid"),
  ("q1 Q0 d1 1 nan t\n", 1, "NaN"),
])
def test_run_errors_name_file_and_line(tmp_path, content, line, pattern):
  path = tmp_path / "x.run"
  path.write_text(content)
  with pytest.raises(trec.TrecFormatError, match=pattern) as err:
    trec.read_run(path)
  msg = str(err.value)
  assert msg.startswith(f"{path}:{line}: ") and "\n" not in msg
  assert err.value.line == line and isinstance(err.value, ValueError)
  lenient = trec.read_run(path, skip_malformed=True)
  assert lenient.skipped == 1


def test_other_errors_name_file_and_line(tmp_path):
  cases = [
    (trec.read_qrels, "q.txt", "q1 0 d1 1\nq1 0 d2\n", 2, "expected 4 fields"),
    (trec.read_qrels, "q2.txt", "q1 0 d1 yes\n", 1, "relevance grade 'yes' is not an integer"),
    (trec.read_topics, "t.tsv", "1\tok\nno tab here\n", 2),
    (trec.read_topics, "t.jsonl", '{"id": "1", "query": "a"}\n{"id": "2"}\n', 2),
    (trec.read_topics, "t2.jsonl", '{"id": "1", "query": "a"}\n{not json\n', 2),
    (trec.read_corpus, "c.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n', 2),
    (trec.read_corpus, "c2.jsonl", '{"_id": "d1"}\n', 1),
  ]
  for reader, name, content, line, *words in cases:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(trec.TrecFormatError) as err:
      reader(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert all(w in str(err.value) for w in words), str(err.value)  # our words, not Python's
  bad_utf8 = tmp_path / "b.run"
  bad_utf8.write_bytes(b"q1 Q0 d1 1 1.0 t\nq1 Q0 \xff 2 1.0 t\n")
  with pytest.raises(trec.TrecFormatError, match=r"b\.run:2: not UTF-8"):
    trec.read_run(bad_utf8)
  with pytest.raises(trec.TrecFormatError, match="no such file"):
    trec.read_run(tmp_path / "missing.run")


def test_corpus_field_precedence(tmp_path):
  rows = [
    {"docid": "a", "segment": "seg", "contents": "con", "title": "T"},
    {"_id": "b", "text": "txt", "passage": "pas", "title": ""},
    {"id": "c", "body": "bod", "passage": "pas"},
    {"id": "d", "passage": "pas"},
  ]
  path = tmp_path / "corpus.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  corpus = trec.read_corpus(path)
  assert corpus == {"a": {"text": "seg", "title": "T"}, "b": {"text": "txt"}, "c": {"text": "bod"},
                    "d": {"text": "pas"}}
  assert titled_content(corpus["a"]) == "Title: T Content: seg"
  assert titled_content(rows[2]) == "bod"


def test_roundtrip_and_rank_order(tmp_path):
  run = {"q1": {"a": 1.0, "b": 3.0, "c": 1.0, "d": 0.1 + 0.2}, "q2": {"x": -1e-300}}
  path = tmp_path / "out" / "run.trec"
  trec.write_run(path, run, tag="rr")
  lines = path.read_text().splitlines()
  assert lines[0] == "q1 Q0 b 1 3.0 rr" and [l.split()[2] for l in lines[:4]] == ["b", "c", "a", "d"]
  assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
  back = trec.read_run(path)
  assert back == run  # repr() scores are lossless
  qrels = {"q1": {"a": 2, "b": 0}}
  trec.write_qrels(tmp_path / "q.txt.gz", qrels)
  assert trec.read_qrels(tmp_path / "q.txt.gz") == qrels
  trec.write_topics(tmp_path / "t.tsv", {"1": "multi\nline\tquery"})
  assert trec.read_topics(tmp_path / "t.tsv") == {"1": "multi line query"}


def test_atomic_write_leaves_no_partial_file(tmp_path):
  path = tmp_path / "run.trec"
  path.write_text("old content\n")

  def docs():
    yield "a", 1.0
    raise RuntimeError("crash mid-write")

  class Exploding(dict):
    def items(self):
      return [("q1", dict(docs()))]

  with pytest.raises(RuntimeError):
    trec.write_run(path, Exploding())
  with pytest.raises(ValueError):
    trec.write_run(path, {"q1": {"bad docid": 1.0}})
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(tmp_path / "new.trec") as f:
      f.write("partial line")
      raise RuntimeError("boom")
  assert path.read_text() == "old content\n"
  assert sorted(os.listdir(tmp_path)) == ["run.trec"]  # no temp files, no new.trec
