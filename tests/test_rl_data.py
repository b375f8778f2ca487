"""rrjax.data.rl: RL rows from training_data_all.jsonl, upstream's verl columns, jsonl/parquet round
trips, and one-line errors for malformed rows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rrjax import tokenizer as tokenizer_lib
from rrjax.data import rl
from rrjax.data.sft import ranking_answer
from rrjax.data.trec import TrecFormatError
from rrjax.ranking import build_prompt
from rrjax.ranking.reward import reward_score

QUERIES = {"q1": "Which [1] planet is largest?", "q2": "boiling point of water"}
DOCS = {"a": "Jupiter is the largest planet.", "b": {"title": "Mars", "text": "Mars is red [2]."},
        "c": "Water boils at 100 C.", "d": "Ice melts at 0 C.", "e": "Café crème."}
ROWS = [
    {"dataset": "toy", "qid": "q1", "initial_list": ["b", "a", "e"], "final_list": ["a", "b", "e"],
     "reasoning": "Jupiter is largest.", "relevant_docids": ["a"]},
    {"dataset": "toy", "qid": "q2", "initial_list": ["d", "c"], "final_list": ["c", "d"],
     "reasoning": "c states it.", "relevant_docids": ["c"]},
]


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load()


@pytest.fixture
def training(tmp_path):
  (tmp_path / "id_query").mkdir()
  (tmp_path / "id_doc").mkdir()
  (tmp_path / "id_query" / "q.json").write_text(json.dumps(QUERIES))
  (tmp_path / "id_doc" / "d.jsonl").write_text("".join(
      json.dumps({"docid": k, **({"text": v} if isinstance(v, str) else v)}) + "\n" for k, v in DOCS.items()))
  path = tmp_path / "training_data_all.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  return path, tmp_path / "id_query", tmp_path / "id_doc"


def test_rows_from_training_jsonl(training, tokenizer):
  rows = rl.rl_rows_from_training_jsonl(*training, tokenizer=tokenizer, split="val")
  assert len(rows) == 2
  r = rows[0]
  assert r.prompt == build_prompt(QUERIES["q1"], [DOCS[d] for d in ROWS[0]["initial_list"]], tokenizer)
  assert r.gold_ranking == "[2] > [1] > [3]" == ranking_answer(r.initial_list, r.final_list)
  assert r.initial_list == ("b", "a", "e") and r.relevant_docids == ("a",) and r.qid == "q1"
  assert (r.data_source, r.dataset, r.index, r.split) == ("ranking", "toy", 0, "val")
  assert [m[0] for m in r.messages] == ["system", "user"]
  assert rl.render_prompt([{"role": a, "content": b} for a, b in r.messages], tokenizer) == r.prompt
  # The gold ranking earns the reward's maximum: ndcg 1 + 0.2 recall 1 + 0.1 rbo 1.
  gold, initial, relevant = rl.reward_inputs(rows)
  assert reward_score(f"<think>x</think> <answer>{gold[0]}</answer>", gold[0], initial[0], relevant[0]) == \
      pytest.approx(1.3, abs=1e-6)


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_round_trip(training, tokenizer, tmp_path, ext):
  rows = rl.rl_rows_from_training_jsonl(*training, tokenizer=tokenizer)
  path = tmp_path / f"rl.{ext}"
  rl.write_rl(path, rows)
  assert rl.read_rl(path, tokenizer=tokenizer) == rows
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rl")]  # no temp files left


def test_parquet_has_upstreams_verl_columns(training, tokenizer, tmp_path):
  rows = rl.rl_rows_from_training_jsonl(*training, tokenizer=tokenizer)
  rl.write_rl_parquet(tmp_path / "train.parquet", rows)
  table = pq.read_table(tmp_path / "train.parquet")
  assert table.column_names == ["prompt", "label", "initial_list", "final_list", "relevant_docids", "dataset",
                                "data_source", "ability", "reward_model", "extra_info"]
  rec = table.to_pylist()[0]
  assert rec["prompt"][0]["role"] == "system" and rec["prompt"][1]["role"] == "user"
  assert rec["data_source"] == rec["ability"] == "ranking"
  assert rec["reward_model"] == {"ground_truth": "[2] > [1] > [3]", "style": "rule"} and rec["label"] == "[2] > [1] > [3]"
  assert set(rec["extra_info"]) == {"final_list", "index", "initial_list", "qid", "relevant_docids", "split"}


def test_reads_upstream_shaped_and_flat_rows(tmp_path, tokenizer):
  messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "rank [1] [2]"}]
  upstream = {"prompt": messages, "label": "[2] > [1]", "initial_list": ["5808333", "764771"],
              "final_list": ["764771", "5808333"], "relevant_docids": ["764771"], "dataset": "msmarco",
              "data_source": "ranking", "ability": "ranking",
              "reward_model": {"ground_truth": "[2] > [1]", "style": "rule"},
              "extra_info": {"final_list": ["764771", "5808333"], "index": 0, "initial_list": ["5808333", "764771"],
                             "relevant_docids": ["764771"], "split": "train"}}
  flat = {"prompt": "<|im_start|>user\nhi<|im_end|>\n", "gold_ranking": "[1]", "initial_list": [7],
          "final_list": [7], "relevant_docids": []}
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps(upstream) + "\n\n" + json.dumps(flat) + "\n")
  a, b = rl.read_rl(path, tokenizer=tokenizer)
  assert a.prompt == rl.render_prompt(messages, tokenizer) and a.gold_ranking == "[2] > [1]"
  assert a.dataset == "msmarco" and a.qid == "" and a.split == "train"
  assert b.prompt == flat["prompt"] and b.initial_list == ("7",) and b.messages == ()
  # Only-in-extra_info lists are found there.
  lean = {k: v for k, v in upstream.items() if k not in ("initial_list", "final_list", "relevant_docids", "label")}
  path.write_text(json.dumps(lean) + "\n")
  assert rl.read_rl(path, tokenizer=tokenizer)[0].initial_list == ("5808333", "764771")
  # Text-prompt rows cannot go to parquet (its prompt column holds messages).
  with pytest.raises(ValueError, match="no chat messages"):
    rl.write_rl_parquet(tmp_path / "x.parquet", [b])


GOOD = {"prompt": "p", "gold_ranking": "[2] > [1]", "initial_list": ["a", "b"], "final_list": ["b", "a"],
        "relevant_docids": ["b"]}


@pytest.mark.parametrize("patch,field", [
    ({"prompt": None}, "prompt"),
    ({"prompt": [{"role": "user"}]}, "prompt"),
    ({"gold_ranking": None}, "gold_ranking"),
    ({"gold_ranking": "[3] > [1]"}, "gold_ranking"),
    ({"gold_ranking": "[1] > [1]"}, "gold_ranking"),
    ({"gold_ranking": "no ids"}, "gold_ranking"),
    ({"initial_list": "a b"}, "initial_list"),
    ({"initial_list": []}, "initial_list"),
    ({"initial_list": ["a", "a"]}, "initial_list"),
    ({"final_list": ["b", "z"]}, "final_list"),
    ({"relevant_docids": None}, "relevant_docids"),
    ({"relevant_docids": ["z"]}, "relevant_docids"),
    ({"reward_model": "rule"}, "reward_model"),
    ({"extra_info": [1]}, "extra_info"),
    ({"index": "zero"}, "index"),
])
def test_malformed_jsonl_row_is_one_line_naming_line_and_field(tmp_path, patch, field):
  path = tmp_path / "bad.jsonl"
  row = {k: v for k, v in {**GOOD, **patch}.items() if v is not None}
  path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(TrecFormatError) as e:
    rl.read_rl(path)
  message = str(e.value)
  assert message.startswith(f"{path}:2: ") and field in message and "\n" not in message


def test_bad_json_and_bad_files(tmp_path, tokenizer):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(GOOD) + "\n{not json\n")
  with pytest.raises(TrecFormatError, match=r"bad\.jsonl:2: bad JSON"):
    rl.read_rl(path)
  path.write_text("[1, 2]\n")
  with pytest.raises(TrecFormatError, match=r":1: expected a JSON object"):
    rl.read_rl(path)
  fake = tmp_path / "fake.parquet"
  fake.write_text("not parquet")
  with pytest.raises(TrecFormatError, match="fake.parquet: cannot read parquet"):
    rl.read_rl(fake)
  with pytest.raises(TrecFormatError, match="no such file"):
    rl.read_rl(tmp_path / "missing.parquet")


def test_malformed_parquet_row_names_the_row(tmp_path, training, tokenizer):
  rows = rl.rl_rows_from_training_jsonl(*training, tokenizer=tokenizer)
  good = rl.to_record(rows[0])
  bad = {**good, "label": None, "reward_model": {"ground_truth": "[9]", "style": "rule"}}
  import pyarrow as pa
  pq.write_table(pa.Table.from_pylist([good, bad], schema=rl._schema()), tmp_path / "b.parquet")
  with pytest.raises(TrecFormatError, match=r"b\.parquet:row 1: field 'reward_model\.ground_truth'"):
    rl.read_rl(tmp_path / "b.parquet", tokenizer=tokenizer)


def test_training_jsonl_errors_pass_through(training, tokenizer):
  path, qdir, ddir = training
  path.write_text(json.dumps({**ROWS[0], "final_list": ["a", "zz"]}) + "\n")
  with pytest.raises(TrecFormatError, match=r"training_data_all\.jsonl:1: field 'final_list'"):
    rl.rl_rows_from_training_jsonl(path, qdir, ddir, tokenizer=tokenizer)
