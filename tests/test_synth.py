"""rrjax.synth: the chat client against a real local HTTP server, the teachers, the filter, the writers
and the synthetic task."""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rrjax import tokenizer as tokenizer_lib
from rrjax.data import trec
from rrjax.data.rl import read_rl
from rrjax.data.sft import read_sft_json, read_training_jsonl
from rrjax.synth import task as task_lib
from rrjax.synth.__main__ import main as synth_main
from rrjax.synth.client import ChatClient, ClientConfig, request_key
from rrjax.synth.formats import write_labelled_set
from rrjax.synth.inputs import task_inputs
from rrjax.synth.pipeline import QueryInput, SynthConfig, ndcg_at_10, passes_filter, synthesize
from rrjax.synth.teachers import (ChatTeacher, JudgeRequest, ProgrammaticTeacher, RankRequest, RankResult,
                                  parse_ranking, parse_verdict)

KEY_ENV = "RRJAX_SYNTH_TEST_KEY"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load()


# ---------------------------------------------------------------- a scripted chat-completions server


class Server:
  """http.server on 127.0.0.1 (ephemeral port). `script(body, attempt) -> (status, payload, delay, headers)`."""

  def __init__(self, script):
    self.script = script
    self.lock = threading.Lock()
    self.requests: list[dict] = []     # every request: path, auth, body, headers (lower-cased names)
    self.attempts: dict[str, int] = {}
    self.in_flight = self.max_in_flight = 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = request_key(body)
        with server.lock:
          server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}})
          attempt = server.attempts[key] = server.attempts.get(key, 0) + 1
          server.in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
          status, payload, delay, headers = server.script(body, attempt)
          time.sleep(delay)
          data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
          self.send_response(status)
          for k, v in headers.items():
            self.send_header(k, v)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client timed out and hung up
        finally:
          with server.lock:
            server.in_flight -= 1

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def bodies(self):
    return [request_key(r["body"]) for r in self.requests]


def ok(content, reasoning=None):
  message = {"role": "assistant", "content": content}
  if reasoning is not None:
    message["reasoning_content"] = reasoning
  return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def echo_script(body, attempt):
  return 200, ok("echo: " + body["messages"][-1]["content"]), 0.0, {}


@pytest.fixture
def server_factory():
  servers = []

  def make(script=echo_script):
    servers.append(Server(script))
    return servers[-1]

  yield make
  for s in servers:
    s.close()


@pytest.fixture
def key_env(monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)


def client_for(server, tmp_path=None, sleeps=None, **kwargs):
  kwargs.setdefault("api_key_env", KEY_ENV)
  kwargs.setdefault("timeout_s", 5.0)
  kwargs.setdefault("backoff_s", 0.01)
  config = ClientConfig(base_url=server.base_url, model="test-model",
                        cache_dir=str(tmp_path / "cache") if tmp_path else None, **kwargs)
  return ChatClient(config, sleep=(sleeps.append if sleeps is not None else time.sleep))


def conv(i):
  return [{"role": "user", "content": f"question {i}"}]


# ---------------------------------------------------------------- client


def test_client_request_protocol(server_factory, key_env, tmp_path):
  server = server_factory(lambda body, a: (200, ok("the answer", "my reasoning"), 0.0, {}))
  client = client_for(server, tmp_path, temperature=0.6, max_tokens=64)
  answer = client.complete(conv(0))
  assert answer.content == "the answer" and answer.reasoning == "my reasoning" and not answer.cached
  (req,) = server.requests
  assert req["path"] == "/v1/chat/completions"
  assert req["auth"] == f"Bearer {KEY}"
  assert req["body"] == {"model": "test-model", "messages": conv(0), "temperature": 0.6, "max_tokens": 64}
  # The key never reaches the cache.
  assert all(KEY not in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
  # No api_key_env: no Authorization header.
  client_for(server, api_key_env=None).complete(conv(1))
  assert server.requests[-1]["auth"] is None


def test_client_missing_key_names_the_variable_not_a_key(server_factory, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  server = server_factory()
  with pytest.raises(ValueError, match=KEY_ENV):
    client_for(server).complete(conv(0))
  assert server.requests == []


def test_client_concurrency_is_bounded(server_factory, key_env):
  server = server_factory(lambda body, a: (200, ok("x"), 0.1, {}))
  answers = client_for(server, max_concurrency=3).complete_many([conv(i) for i in range(12)])
  assert all(a is not None for a in answers)
  assert server.max_in_flight == 3


def test_client_retries_429_5xx_and_timeouts_with_backoff(server_factory, key_env):
  def script(body, attempt):
    text = body["messages"][0]["content"]
    if text == "question 0" and attempt == 1:
      return 429, {"error": "slow down"}, 0.0, {}
    if text == "question 0" and attempt == 2:
      return 500, {"error": "oops"}, 0.0, {}
    if text == "question 1" and attempt == 1:
      return 200, ok("late"), 1.0, {}  # past the client's timeout
    if text == "question 2" and attempt == 1:
      return 503, b"unavailable", 0.0, {"Retry-After": "0.05"}
    return 200, ok(f"fine {text}"), 0.0, {}

  server = server_factory(script)
  sleeps = []
  client = client_for(server, sleeps=sleeps, max_concurrency=1, timeout_s=0.3)
  answers = client.complete_many([conv(i) for i in range(3)])
  assert [a.content for a in answers] == ["fine question 0", "fine question 1", "fine question 2"]
  assert client.stats.retries == 4 and client.stats.failed == 0 and client.stats.answered == 3
  assert sorted(server.attempts.values()) == [2, 2, 3]
  # Exponential backoff (0.01, 0.02 for question 0; 0.01 for the timeout), Retry-After wins when longer.
  assert sleeps == pytest.approx([0.01, 0.02, 0.01, 0.05])


def test_client_gives_up_after_max_retries_and_on_4xx(server_factory, key_env):
  def script(body, attempt):
    return (503, b"down", 0.0, {}) if "question 0" in json.dumps(body) else (400, b"bad request", 0.0, {})

  server = server_factory(script)
  client = client_for(server, sleeps=[], max_retries=2)
  assert client.complete_many([conv(0), conv(1)]) == [None, None]
  assert client.stats.failed == 2 and client.stats.retries == 2
  assert sorted(server.attempts.values()) == [1, 3]  # 4xx is not retried


def test_client_sends_only_the_key_named_by_api_key_env(server_factory, key_env, monkeypatch):
  # The SDK's own environment credentials and OpenAI ids must not reach an arbitrary base_url.
  monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient")
  monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-custom")
  monkeypatch.setenv("OPENAI_ORG_ID", "org-ambient")
  monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-ambient")
  server = server_factory()
  client_for(server).complete(conv(0))
  client_for(server, api_key_env=None).complete(conv(1))
  assert [r["auth"] for r in server.requests] == [f"Bearer {KEY}", None]
  assert not any(h in r["headers"] for r in server.requests for h in ("openai-organization", "openai-project"))


def test_client_retry_after_ms_and_long_retry_after(server_factory, key_env, caplog):
  def script(body, attempt):
    text = body["messages"][0]["content"]
    if text == "question 0" and attempt == 1:
      return 429, b"slow down", 0.0, {"retry-after-ms": "70"}
    if text == "question 1":
      return 503, b"down for maintenance", 0.0, {"Retry-After": "3600"}  # over the SDK's 2 minutes: not retried
    return 200, ok("fine"), 0.0, {}

  server = server_factory(script)
  sleeps = []
  client = client_for(server, sleeps=sleeps, max_concurrency=1)
  with caplog.at_level("WARNING", logger="rrjax.synth"):
    answers = client.complete_many([conv(0), conv(1)])
  assert answers[0].content == "fine" and answers[1] is None
  assert sleeps == pytest.approx([0.07]) and server.attempts[request_key(client.body(conv(1)))] == 1
  assert client.stats.as_dict() == {"sent": 3, "answered": 1, "cache_hits": 0, "retries": 1, "failed": 1,
                                    "malformed": 0}
  (record,) = caplog.records
  assert record.getMessage().startswith(f"{server.base_url}/chat/completions: HTTP 503 Service Unavailable")
  assert KEY not in record.getMessage() and "\n" not in record.getMessage()


def test_client_counts_and_skips_malformed_answers(server_factory, key_env, tmp_path):
  payloads = [b"not json", {"choices": []}, {"choices": [{"message": {"content": 7}}]}, ok("good")]
  server = server_factory(lambda body, a: (200, payloads[int(body["messages"][0]["content"].split()[-1])], 0.0, {}))
  client = client_for(server, tmp_path)
  answers = client.complete_many([conv(i) for i in range(4)])
  assert answers[:3] == [None, None, None] and answers[3].content == "good"
  assert client.stats.malformed == 3 and client.stats.retries == 0
  assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # malformed answers are not cached


def test_client_resumes_from_cache_after_abort(server_factory, key_env, tmp_path):
  server = server_factory(lambda body, a: (200, ok("answer " + body["messages"][0]["content"]), 0.02, {}))
  convs = [conv(i) for i in range(10)]

  def abort_after_three(i, answer, seen=[]):
    seen.append(i)
    if len(seen) == 3:
      raise KeyboardInterrupt  # a user's ^C midway

  with pytest.raises(KeyboardInterrupt):
    client_for(server, tmp_path, max_concurrency=2).complete_many(convs, on_result=abort_after_three)
  asked_first = len(server.requests)
  assert 3 <= asked_first < 10
  resumed = client_for(server, tmp_path, max_concurrency=2)
  answers = resumed.complete_many(convs)
  assert [a.content for a in answers] == [f"answer question {i}" for i in range(10)]
  keys = server.bodies()
  assert len(keys) == len(set(keys)) == 10  # nothing was asked twice
  assert resumed.stats.cache_hits == asked_first
  # A third run asks nothing.
  again = client_for(server, tmp_path)
  again.complete_many(convs + convs)  # duplicates inside a batch are served once too
  assert len(server.requests) == 10 and again.stats.cache_hits == 20


# ---------------------------------------------------------------- teachers


def teacher_script(body, attempt):
  """Answers rrjax's pointwise prompt and the RankGPT conversation by solving the synthetic task."""
  messages = body["messages"]
  prog = ProgrammaticTeacher()
  last = messages[-1]["content"]
  if last.startswith("Determine if"):
    query = re.search(r"^Query: (.*)$", last, re.M).group(1)
    passage = re.search(r"^Passage: (.*)$", last, re.M).group(1)
    (verdict,) = prog.judge([JudgeRequest(query, passage)])
    return 200, ok(f"<think>checking</think> {'true' if verdict else 'false'}"), 0.0, {}
  query = re.match(r"Search Query: (.*)\. \n", last).group(1)
  passages = [re.match(r"\[\d+\] (.*)$", m["content"]).group(1) for m in messages[:-1]
              if m["role"] == "user" and re.match(r"\[\d+\] ", m["content"])]
  (result,) = prog.rank([RankRequest(query, tuple(passages))])
  return 200, ok(" > ".join(f"[{i + 1}]" for i in result.permutation), result.reasoning), 0.0, {}


def test_chat_teacher_pipeline_end_to_end_and_resume(server_factory, key_env, tmp_path, tokenizer):
  task = task_lib.generate(task_lib.TaskConfig(seed=3, num_train=4, num_test=0))
  inputs = task_inputs(task, "train")
  server = server_factory(teacher_script)
  teacher = ChatTeacher(client_for(server, tmp_path, max_concurrency=4), tokenizer)
  samples, report = synthesize(inputs, teacher)
  expected, _ = synthesize(inputs, ProgrammaticTeacher())
  assert samples == expected and report.kept == 4
  n_requests = len(server.requests)
  assert n_requests == 4 * 10 + 4
  # The listwise request is upstream's RankGPT conversation: user/assistant turns per passage.
  rank_msgs = next(r["body"]["messages"] for r in server.requests if len(r["body"]["messages"]) > 1)
  assert rank_msgs[0]["role"] == "system" and rank_msgs[2]["content"] == "Okay, please provide the passages."
  assert rank_msgs[4]["content"] == "Received passage [1]." and rank_msgs[-1]["content"].startswith("Search Query: ")
  # A rerun resumes entirely from the cache.
  again = ChatTeacher(client_for(server, tmp_path), tokenizer)
  assert synthesize(inputs, again)[0] == expected
  assert len(server.requests) == n_requests


def test_chat_teacher_counts_malformed_answers(server_factory, key_env, tokenizer):
  def script(body, attempt):
    last = body["messages"][-1]["content"]
    return 200, ok("<think>hmm</think> I am not sure" if last.startswith("Determine") else "no ranking here"), 0.0, {}

  server = server_factory(script)
  teacher = ChatTeacher(client_for(server), tokenizer)
  assert teacher.judge([JudgeRequest("q", "p")]) == [None]
  assert teacher.rank([RankRequest("q", ("a", "b"))]) == [None]
  assert teacher.stats["malformed_judge"] == 1 and teacher.stats["malformed_rank"] == 1
  # A ranking without any reasoning is malformed unless allowed.
  server2 = server_factory(lambda body, a: (200, ok("[2] > [1]"), 0.0, {}))
  assert ChatTeacher(client_for(server2), tokenizer).rank([RankRequest("q", ("a", "b"))]) == [None]
  lenient = ChatTeacher(client_for(server2), tokenizer, require_reasoning=False)
  assert lenient.rank([RankRequest("q", ("a", "b"))]) == [RankResult("", (1, 0))]


def test_rankgpt_deepseek_variant_has_no_system_turn():
  from rrjax.synth.teachers import rankgpt_messages
  msgs = rankgpt_messages("why?", ["a", "b"], "deepseek-reasoner")
  assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith("You are an intelligent assistant")
  assert [m["role"] for m in msgs].count("system") == 0 and len(msgs) == 2 + 2 * 2 + 1


def test_answer_parsers():
  assert parse_verdict("<think>it is true that...</think> false") is False
  assert parse_verdict("True.") is True and parse_verdict("unclear") is None
  assert parse_ranking("[3] > [1]", 3) == (2, 0, 1)
  assert parse_ranking("<think>x</think> <answer>[2] > [1]</answer>", 2) == (1, 0)
  assert parse_ranking("nothing", 3) is None and parse_ranking("[9] > [8]", 3) is None


# ---------------------------------------------------------------- the self-consistency filter


class FixedTeacher:
  """Judges by a set of positives and ranks by a fixed permutation."""

  name = "fixed"

  def __init__(self, positives, perm):
    self.positives, self.perm, self.stats = positives, perm, {}

  def judge(self, requests):
    return [r.passage in self.positives for r in requests]

  def rank(self, requests):
    return [RankResult("because", tuple(self.perm)) for _ in requests]


def one_query(n=10):
  return QueryInput("q1", "query", tuple(f"d{i}" for i in range(n)), tuple(f"p{i}" for i in range(n)))


@pytest.mark.parametrize("rank,kept", [(1, True), (4, True), (5, False), (11, False)])
def test_filter_one_positive_at_rank(rank, kept):
  # One positive (passage 0) placed at `rank`: NDCG@10 = 1/log2(rank + 1); 0.4307 at 4, 0.3869 at 5.
  n = 12
  perm = list(range(1, n))
  perm.insert(rank - 1, 0)
  samples, report = synthesize([one_query(n)], FixedTeacher({"p0"}, perm), SynthConfig(alpha=0.4, max_window=20))
  assert (len(samples) == 1) is kept and report.filtered == (0 if kept else 1)


def test_filter_keeps_exactly_alpha():
  assert passes_filter(0.4, 0.4) and not passes_filter(0.4 - 1e-6, 0.4)
  q = one_query()
  perm = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]  # positives p0, p1 at ranks 2 and 3
  score = ndcg_at_10([f"d{i}" for i in perm], {"d0", "d1"})
  assert score == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3)))
  teacher = FixedTeacher({"p0", "p1"}, perm)
  assert len(synthesize([q], teacher, SynthConfig(alpha=score))[0]) == 1        # NDCG == alpha: kept
  assert len(synthesize([q], teacher, SynthConfig(alpha=score + 1e-6))[0]) == 0  # just above: dropped
  assert synthesize([q], FixedTeacher(set(), perm))[1].filtered == 1            # no positives: NDCG 0


def test_ndcg_matches_jax_metrics():
  from rrjax.ranking import metrics
  rng = np.random.default_rng(0)
  for _ in range(5):
    rel = {f"d{i}" for i in rng.choice(15, size=int(rng.integers(1, 6)), replace=False)}
    ranked = [f"d{i}" for i in rng.permutation(15)]
    gains = np.array([[float(d in rel) for d in ranked]])
    expected = float(metrics.ndcg_at_k(gains, np.ones((1, len(rel))), 10)[0])
    assert ndcg_at_10(ranked, rel) == pytest.approx(expected, abs=1e-6)


def test_malformed_teacher_answers_skip_the_query():
  class Broken(FixedTeacher):
    def judge(self, requests):
      return [None if r.passage == "p3" else False for r in requests]

  samples, report = synthesize([one_query()], Broken(set(), list(range(10))))
  assert samples == [] and report.skipped_malformed_judge == 1


# ---------------------------------------------------------------- the synthetic task


def test_task_is_deterministic_by_seed():
  cfg = task_lib.TaskConfig(seed=5, num_train=30, num_test=10)
  assert task_lib.generate(cfg) == task_lib.generate(cfg)
  assert task_lib.generate(cfg) != task_lib.generate(dataclasses.replace(cfg, seed=6))
  a, b = task_lib.first_stage_run(task_lib.generate(cfg).queries, 5), task_lib.first_stage_run(task_lib.generate(cfg).queries, 5)
  assert a == b


def test_task_shape_and_ground_truth():
  cfg = task_lib.TaskConfig(seed=1, num_train=200, num_test=50)
  task = task_lib.generate(cfg)
  assert len(task.split("train")) == 200 and len(task.split("test")) == 50
  for q in task.queries:
    assert len(q.passages) == cfg.passages_per_query and cfg.min_relevant <= len(q.relevant) <= cfg.max_relevant
    assert all(task_lib.is_relevant(q.op, v, q.threshold) == (d in q.relevant) for d, v in zip(q.docids, q.values))
    assert len({p.split()[1] for p in q.passages}) == len(q.passages)  # distinct item names
  # Boundary distractors (value == threshold, never relevant) are common: they fool word overlap.
  assert sum(any(v == q.threshold for v in q.values) for q in task.queries) > 0.5 * len(task.queries)


def test_programmatic_teacher_is_correct(tokenizer):
  task = task_lib.generate(task_lib.TaskConfig(seed=2, num_train=100, num_test=0))
  teacher = ProgrammaticTeacher()
  for q, inp in zip(task.split("train"), task_inputs(task, "train")):
    verdicts = teacher.judge([JudgeRequest(inp.query, p) for p in inp.passages])
    assert {d for d, v in zip(inp.docids, verdicts) if v} == q.relevant
    (result,) = teacher.rank([RankRequest(inp.query, inp.passages)])
    top = {inp.docids[i] for i in result.permutation[:len(q.relevant)]}
    assert top == q.relevant and sorted(result.permutation) == list(range(len(inp.docids)))
    # One step per passage, citing the passage's value and the query's threshold.
    steps = re.findall(r"\[(\d+)\] (\d+)([<>])(\d+) (yes|no)\.", result.reasoning)
    assert [int(s[0]) for s in steps] == list(range(1, len(inp.passages) + 1))
    assert all(int(s[3]) == q.threshold and (s[4] == "yes") == (inp.docids[int(s[0]) - 1] in q.relevant)
               for s in steps)
  assert teacher.rank([RankRequest("What is BM25?", ("a passage",))]) == [None]
  assert teacher.judge([JudgeRequest("Which items cost less than 3?", "not a fact")]) == [None]
  assert teacher.stats["malformed_rank"] == 1 and teacher.stats["malformed_judge"] == 1


def test_programmatic_teacher_reads_passages_through_the_passage_rule():
  # A passage with no string text field is unreadable (malformed; a non-string text used to raise
  # AttributeError here), as is a titled one; text fields other than "text" count, by the rule's precedence.
  teacher = ProgrammaticTeacher()
  passages = [{"title": "t"}, {"text": 5}, {"title": "T", "text": "item a costs 2"}, "item b costs 2",
              {"passage": " item c costs 4 "}, {"body": "item d costs 1", "passage": "item d costs 9"}]
  got = teacher.judge([JudgeRequest("Which items cost less than 3?", p) for p in passages])
  assert got == [None, None, None, True, False, True]
  assert teacher.stats["malformed_judge"] == 3


def test_lexical_first_stage_is_far_below_the_oracle_on_heldout():
  task = task_lib.generate(task_lib.TaskConfig(seed=0, num_train=0, num_test=300))
  scores = task_lib.measure(task.split("test"))
  assert scores["oracle"] == pytest.approx(1.0)
  assert scores["first_stage"] < 0.55
  assert scores["oracle"] - scores["first_stage"] > 0.4


# ---------------------------------------------------------------- writers and the CLI


def test_writers_round_trip_through_the_sft_and_rl_readers(tmp_path, tokenizer):
  task = task_lib.generate(task_lib.TaskConfig(seed=4, num_train=6, num_test=0))
  inputs = task_inputs(task, "train")
  samples, _ = synthesize(inputs, ProgrammaticTeacher())
  paths = write_labelled_set(tmp_path, samples, inputs, tokenizer, max_passage_tokens=512)
  from_jsonl = list(read_training_jsonl(paths["training_jsonl"], paths["id_query"], paths["id_doc"],
                                        tokenizer=tokenizer))
  from_sft = list(read_sft_json(paths["sft_json"], tokenizer=tokenizer))
  assert [(e.prompt, e.target) for e in from_jsonl] == [(e.prompt, e.target) for e in from_sft]
  assert [e.metadata["final_list"] for e in from_jsonl] == [list(s.final_list) for s in samples]
  assert [e.metadata["relevant_docids"] for e in from_jsonl] == [list(s.relevant_docids) for s in samples]
  assert from_sft[0].target.startswith("<think>Relevant if cost ") and "</think> <answer>[" in from_sft[0].target
  for fmt in ("rl_parquet", "rl_jsonl"):
    rows = read_rl(paths[fmt], tokenizer=tokenizer)
    assert [r.prompt for r in rows] == [e.prompt for e in from_jsonl]
    assert [r.final_list for r in rows] == [s.final_list for s in samples]
    assert [r.qid for r in rows] == [s.qid for s in samples]


def test_cli_synthetic_task(tmp_path, capsys):
  out = tmp_path / "out"
  assert synth_main(["--out", str(out), "--num_train", "12", "--num_test", "8", "--seed", "9"]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["train"]["labelled"]["kept"] == 12 and report["test"]["labelled"]["kept"] == 8
  assert report["heldout_ndcg10"]["oracle"] == pytest.approx(1.0)
  test_dir = out / "test"
  topics = trec.read_topics(test_dir / "topics.tsv")
  run, qrels = trec.read_run(test_dir / "run.lexical.txt"), trec.read_qrels(test_dir / "qrels.txt")
  corpus = trec.read_corpus(test_dir / "corpus.jsonl")
  assert set(topics) == set(run) == set(qrels) and len(topics) == 8
  assert all(d in corpus for docs in run.values() for d in docs)
  assert len(read_rl(out / "train" / "rl.parquet")) == 12


def test_cli_bad_input_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "rrjax.synth", "--out", str(tmp_path / "o"), "--run",
                         str(tmp_path / "missing.txt"), "--queries", "q", "--corpus", "c"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_local_teacher_decodes_and_parses(monkeypatch, tokenizer):
  import rrjax.decode
  outputs = iter([["<think>yes it is</think> true", "</think> false", "no idea"],
                  ["<think>[2] wins</think> <answer>[2] > [1]</answer><|im_end|>", "[1] > [2]"]])
  calls = []

  def fake_generate(model, prompts, *, max_new_tokens, temperature, engine):
    calls.append((len(prompts), max_new_tokens, temperature))
    texts = next(outputs)
    return rrjax.decode.Generation([tokenizer.encode(t) for t in texts], [[] for _ in texts], [0] * len(texts),
                                   ["stop"] * len(texts))

  monkeypatch.setattr(rrjax.decode, "generate", fake_generate)
  from rrjax.synth.teachers import LocalTeacher
  teacher = LocalTeacher(object(), tokenizer, max_new_tokens=32)
  assert teacher.judge([JudgeRequest("q", f"p{i}") for i in range(3)]) == [True, False, None]
  assert teacher.rank([RankRequest("q", ("a", "b"))] * 2) == [RankResult("[2] wins", (1, 0)), None]
  assert calls == [(3, 32, 0.0), (2, 32, 0.0)]
  assert teacher.stats == {"judged": 2, "ranked": 1, "malformed_judge": 1, "malformed_rank": 1}


def test_cli_chat_teacher_on_trec_files_resumes(server_factory, key_env, tmp_path):
  task = task_lib.generate(task_lib.TaskConfig(seed=11, num_train=0, num_test=3))
  files = task_lib.write_split(task, "test", tmp_path / "in")
  answers = tmp_path / "answers.tsv"
  trec.write_topics(answers, {q.qid: f"answer-{q.qid}" for q in task.split("test")})
  server = server_factory(teacher_script)
  argv = ["--out", str(tmp_path / "out"), "--teacher", "chat", "--base_url", server.base_url, "--model", "m",
          "--api_key_env", KEY_ENV, "--run", files["run"], "--queries", files["queries"], "--corpus", files["corpus"],
          "--answers", str(answers), "--dataset", "mine", "--max_window", "8"]
  assert synth_main(argv) == 0
  assert len(server.requests) == 3 * 8 + 3
  assert all("answer-test-q" in json.dumps(r["body"]) for r in server.requests)
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  # A query whose positives all fall outside the top 8 has NDCG 0 and is filtered.
  run = trec.read_run(files["run"])
  kept = sum(any(d in q.relevant for d, _ in trec.ranked(run[q.qid])[:8]) for q in task.split("test"))
  assert report["labelled"]["kept"] == kept == 3 - report["labelled"]["filtered"]
  assert report["client_stats"]["answered"] == 27
  rows = [json.loads(line) for line in (tmp_path / "out" / "training_data_all.jsonl").read_text().splitlines()]
  assert [len(r["initial_list"]) for r in rows] == [8] * kept and {r["dataset"] for r in rows} == {"mine"}
  assert synth_main(argv) == 0  # the rerun is served from OUT/cache
  assert len(server.requests) == 27


def test_heldout_pools_can_be_larger_than_one_window():
  cfg = task_lib.TaskConfig(seed=3, num_train=5, num_test=5, passages_per_query=6, test_passages_per_query=12)
  task = task_lib.generate(cfg)
  assert {len(q.passages) for q in task.split("train")} == {6}
  assert {len(q.passages) for q in task.split("test")} == {12}
  # The training split does not depend on the held-out pool size.
  assert task_lib.generate(dataclasses.replace(cfg, test_passages_per_query=None)).split("train") == task.split("train")
  with pytest.raises(ValueError, match="test_passages_per_query"):
    task_lib.TaskConfig(max_relevant=3, test_passages_per_query=3)
