"""Benchmarks in their published layouts (rrjax.data.corpus, rrjax.data.benchmarks), on small files written here:
BRIGHT's hub snapshot (parquet), BEIR's folder, MS MARCO's tsv files read to the same corpus, queries and
qrels as the equivalent jsonl/tsv/TREC files; a large parquet corpus is streamed keeping only a run's
documents; malformed rows name their file and row."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from bright_fixtures import bright_for_bundled_run, write_bright, write_jsonl, write_parquet
from rrjax.data import benchmarks, corpus, trec
from rrjax.data.inputs import load_inputs

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"d1": ("Title one", "first passage, ünïcode"), "d2": (None, "second passage"), "d3": ("T3", "third [1]"),
        "d4": (None, "fourth passage"), "d5": ("", "fifth")}
QUERIES = {"q1": "first query", "q2": "second query?"}
QRELS = {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1, "d5": 0}}
RUN = "".join(f"{q} Q0 {d} {r} {s} bm25\n" for q, ds in (("q1", "d1 d2 d3 d4 d5"), ("q2", "d5 d4 d3 d2 d1"))
              for r, (d, s) in enumerate(zip(ds.split(), (9.0, 8.0, 7.0, 6.0, 5.0)), 1))


@pytest.fixture
def reference(tmp_path):
  """The same data as plain files: jsonl corpus (with and without titles), tsv topics, TREC qrels and run."""
  ref = tmp_path / "ref"
  write_jsonl(ref / "corpus.jsonl", [{"docid": d, "title": t, "text": x} for d, (t, x) in DOCS.items()])
  write_jsonl(ref / "untitled.jsonl", [{"docid": d, "text": x} for d, (_, x) in DOCS.items()])
  trec.write_topics(ref / "topics.tsv", QUERIES)
  trec.write_qrels(ref / "qrels.txt", QRELS)
  (ref / "run.trec").write_text(RUN)
  return ref


def _same_inputs(a, b):
  assert [(q.qid, q.text, [(c.docid, c.score, c.doc) for c in q.candidates]) for q in a.queries] == \
         [(q.qid, q.text, [(c.docid, c.score, c.doc) for c in q.candidates]) for q in b.queries]


def test_bright_snapshot_reads_like_jsonl(tmp_path, reference):
  snap = write_bright(tmp_path / "BRIGHT", "earth_science", {d: x for d, (_, x) in DOCS.items()}, QUERIES,
                      {q: list(d) for q, d in QRELS.items()})
  ds = benchmarks.resolve("bright:earth-science", snap, run=str(reference / "run.trec"))
  assert ds.name == "bright:earth_science" and len(ds.corpus) == 2  # both shards
  assert corpus.read_documents(ds.corpus) == trec.read_corpus(reference / "untitled.jsonl")
  assert corpus.read_queries(ds.queries) == trec.read_topics(reference / "topics.tsv") == QUERIES
  assert ds.read_qrels() == {q: dict.fromkeys(d, 1) for q, d in QRELS.items()}  # gold_ids: relevance 1
  assert set(benchmarks.resolve("bright:earth_science", write_bright(
      tmp_path / "B2", "earth_science", {"d1": "x"}, QUERIES, {"q1": ["d1"]}), run="r").read_qrels()) == {"q1"}
  _same_inputs(ds.load(top_k=3), load_inputs(reference / "untitled.jsonl", reference / "run.trec",
                                             reference / "topics.tsv", top_k=3))
  # The hub cache's layout, from the cache root or the dataset's folder; bright-long reads long_documents/.
  cache = tmp_path / "hub" / "datasets--xlangai--BRIGHT"
  (cache / "snapshots").mkdir(parents=True)
  snap.rename(cache / "snapshots" / "abc123")
  (cache / "refs").mkdir()
  (cache / "refs" / "main").write_text("abc123")
  for root in (tmp_path / "hub", cache):
    assert benchmarks.bright_snapshot(root) == cache / "snapshots" / "abc123"
  long = benchmarks.resolve("bright-long:earth_science", tmp_path / "hub", run=str(reference / "run.trec"))
  assert set(corpus.read_documents(long.corpus)) == {f"long/{d}" for d in DOCS}
  assert long.read_qrels() == {q: {f"long/{d}": 1 for d in docs} for q, docs in QRELS.items()}
  with pytest.raises(ValueError, match="give --run"):
    benchmarks.resolve("bright-long:earth_science", tmp_path / "hub")


def test_beir_folder_reads_like_jsonl(tmp_path, reference):
  beir = tmp_path / "scifact"
  write_jsonl(beir / "corpus.jsonl", [{"_id": d, "title": t or "", "text": x, "metadata": {}}
                                      for d, (t, x) in DOCS.items()])
  write_jsonl(beir / "queries.jsonl", [{"_id": q, "text": x, "metadata": {}} for q, x in QUERIES.items()])
  (beir / "qrels").mkdir()
  (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
      f"{q}\t{d}\t{r}\n" for q, docs in QRELS.items() for d, r in docs.items()))
  ds = benchmarks.resolve("beir", beir, run=str(reference / "run.trec"))
  assert corpus.read_documents(ds.corpus) == trec.read_corpus(reference / "corpus.jsonl")
  assert corpus.read_queries(ds.queries) == QUERIES
  assert ds.read_qrels() == trec.read_qrels(reference / "qrels.txt") == QRELS
  _same_inputs(ds.load(), load_inputs(reference / "corpus.jsonl", reference / "run.trec", reference / "topics.tsv"))
  with pytest.raises(ValueError, match=r"qrels/dev\.tsv: no qrels for --split dev"):
    benchmarks.resolve("beir", beir, split="dev", run=str(reference / "run.trec"))
  with pytest.raises(ValueError, match="give --run"):
    benchmarks.resolve("beir", beir)


def test_msmarco_files_read_like_jsonl(tmp_path, reference):
  ms = tmp_path / "msmarco"
  ms.mkdir()
  (ms / "collection.tsv").write_text("".join(f"{d}\t{x}\n" for d, (_, x) in DOCS.items()), encoding="utf-8")
  (ms / "queries.dev.tsv").write_text("".join(f"{q}\t{x}\n" for q, x in QUERIES.items()))
  (ms / "qrels.dev.tsv").write_text("".join(f"{q}\t0\t{d}\t{r}\n" for q, docs in QRELS.items()
                                             for d, r in docs.items()))
  ds = benchmarks.resolve("msmarco", ms, run=str(reference / "run.trec"), queries=str(ms / "queries.dev.tsv"),
                          qrels=str(ms / "qrels.dev.tsv"))
  assert corpus.read_documents(ds.corpus) == trec.read_corpus(reference / "untitled.jsonl")
  assert ds.read_qrels() == QRELS
  _same_inputs(ds.load(top_k=2), load_inputs(reference / "untitled.jsonl", reference / "run.trec",
                                             reference / "topics.tsv", top_k=2))
  with pytest.raises(ValueError, match="give --run and --queries"):
    benchmarks.resolve("msmarco", ms)


def test_bright_with_the_bundled_run(tmp_path):
  run = trec.read_run(benchmarks.bundled_run("stackoverflow"), skip_malformed=True)
  first = next(iter(run))
  top = [d for d, _ in trec.ranked(run[first])]
  snap = bright_for_bundled_run(tmp_path / "B", "stackoverflow", num_queries=2, top_k=4, excluded={first: [top[1]]})
  ds = benchmarks.resolve("bright:stackoverflow", snap)
  assert ds.run == str(benchmarks.bundled_run("stackoverflow"))
  inputs = ds.load(top_k=4, max_queries=2)
  assert inputs.sources["run_lines_skipped"] == 12  # docids with spaces, skipped as upstream does
  assert inputs.sources["excluded_candidates"] == 1
  assert [c.docid for c in inputs.queries[0].candidates] == [top[0]] + top[2:5]  # excluded_ids are not candidates
  assert inputs.queries[0].text == f"synthetic query {first} of stackoverflow"
  assert inputs.queries[0].candidates[0].doc["text"].endswith(f"for {top[0]}")


def test_parquet_corpus_keeps_only_the_runs_documents(tmp_path):
  """200k rows in hub-sized row groups: memory stays near one record batch plus the kept documents."""
  path = tmp_path / "documents" / "big-00000-of-00001.parquet"
  n = 200_000
  path.parent.mkdir(parents=True)
  table = pa.table({"id": [f"doc{i:06d}" for i in range(n)],
                    "content": [f"passage {i} about tiny things" for i in range(n)]})
  import pyarrow.parquet as pq
  pq.write_table(table, path, row_group_size=20_000)
  script = textwrap.dedent(f"""
      import json, sys, tracemalloc
      import pyarrow as pa
      from rrjax.data import corpus
      wanted = {{f"doc{{i:06d}}" for i in range(7, {n}, 10_000)}}
      tracemalloc.start()
      docs = corpus.read_documents({str(path)!r}, wanted)
      print(json.dumps({{"docs": len(docs), "ok": all(docs[d]["text"] == f"passage {{int(d[3:])}} about tiny things"
                                                      for d in wanted),
                        "python_peak": tracemalloc.get_traced_memory()[1],
                        "arrow_peak": pa.default_memory_pool().max_memory()}}))
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  assert got["docs"] == 20 and got["ok"]
  # Reading all 200k rows as Python objects takes ~70 MB, the decoded table ~10 MB (table.nbytes).
  assert got["python_peak"] < 16e6, got
  assert got["arrow_peak"] < 0.8 * table.nbytes, got


def _docs(n=10, **changes):
  rows = [{"id": f"d{i}", "content": f"text {i}"} for i in range(n)]
  for i, row in changes.items():
    rows[int(i[1:])].update(row)
  return rows


# (file, what the test writes there, reader, wanted, the one-line error)
MALFORMED = {
  "null_id": ("docs.parquet", _docs(r6={"id": None}), corpus.read_documents, None,
              r"docs\.parquet: row 6: the document id is null"),
  "null_text": ("docs.parquet", _docs(r4={"content": None}), corpus.read_documents, {"d4"},
                r"docs\.parquet: row 4: document 'd4' has a null 'content'"),
  "no_text_column": ("docs.parquet", [{"id": "d0", "words": "x"}], corpus.read_documents, None,
                     r"docs\.parquet: no text column .* columns: id, words"),
  "not_parquet": ("docs.parquet", "not parquet", corpus.read_documents, None, r"docs\.parquet: not a readable parquet"),
  "tsv_line": ("collection.tsv", "1\tone\n2\ttwo\nthree without a tab\n", corpus.read_documents, None,
               r"collection\.tsv:3: expected 'docid<TAB>text'"),
  "jsonl_line": ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', corpus.read_documents, None,
                 r"corpus\.jsonl:2: bad JSON"),
  "beir_qrels": ("test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n", corpus.read_qrels, None,
                 r"test\.tsv:3: score 'high' is not an integer"),
  "gold_ids_type": ("ex.parquet", [{"id": "0", "query": "q", "gold_ids": "d1"}], corpus.read_qrels, None,
                    r"ex\.parquet: row 0: 'gold_ids' must be a list of strings"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_rows_name_file_and_row(case, tmp_path):
  name, content, read, wanted, match = MALFORMED[case]
  path = tmp_path / name
  if isinstance(content, str):
    path.write_text(content)
  else:
    write_parquet(path, content)
  with pytest.raises(trec.TrecFormatError, match=match):
    read(path, wanted) if wanted else read(path)


def test_duplicate_ids_across_shards_name_both(tmp_path):
  write_parquet(tmp_path / "a.parquet", _docs()[:3])
  write_parquet(tmp_path / "b.parquet", _docs()[2:4])
  with pytest.raises(trec.TrecFormatError, match=r"b\.parquet: row 0: duplicate document id 'd2' \(first at "
                                                 r".*a\.parquet row 2\)"):
    corpus.read_documents([tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_rerank_cli_names_a_missing_layout(tmp_path):
  from rrjax.rerank import cli as rerank_cli
  common = ["--model", "m", "--out", str(tmp_path / "o.trec")]
  with pytest.raises(ValueError, match=r"no BRIGHT snapshot .*huggingface-cli download xlangai/BRIGHT"):
    rerank_cli.main(common + ["--dataset", "bright:biology", "--data_dir", str(tmp_path)])
  with pytest.raises(ValueError, match=r"unknown BRIGHT task 'chemistry'"):
    rerank_cli.main(common + ["--dataset", "bright:chemistry", "--data_dir", str(tmp_path)])
  with pytest.raises(ValueError, match=r"give --corpus .* or --dataset"):
    rerank_cli.main(common)
  snap = write_bright(tmp_path / "B", "pony", {"a": "x"}, {"0": "q"}, {"0": ["a"]})
  with pytest.raises(ValueError, match=r"examples: no biology-\*\.parquet"):
    rerank_cli.main(common + ["--dataset", "bright:biology", "--data_dir", str(snap)])
  assert list(tmp_path.glob("o.*")) == []
