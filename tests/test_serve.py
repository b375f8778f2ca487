"""`python -m rrjax.serve` as a subprocess on 127.0.0.1 with a tiny model, driven by httpx, and rrjax.Reranker:
response shapes, Cohere- and Jina-style bodies, 16 concurrent clients ranking as the CLI does, bad input,
queue limits, deadlines, disconnects and SIGTERM; the README's Reranker snippet."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test model writes digit runs (see `digits_dir`): windows of 10 read as real permutations.
SETTINGS = ["--window", "10", "--stride", "5", "--max-passage-tokens", "30"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A tiny random model whose output head favours the digits and ` >`: greedy answers such as `7 >5 >5`
  that depend on the prompt, so rankings move (a plain random tiny model writes newlines: identity)."""
  from flax import nnx

  from rrjax.model.hf import save_pretrained
  from rrjax.model.qwen2 import Qwen2, Qwen2Config

  model = Qwen2(Qwen2Config.tiny(tie_word_embeddings=False), rngs=nnx.Rngs(0))
  head_DxV = model.lm_head[...]
  model.lm_head[...] = head_DxV.at[:, 16:25].multiply(30.0).at[:, 861].multiply(30.0)  # '1'..'9', ' >'
  path = tmp_path_factory.mktemp("model") / "digits"
  save_pretrained(model, path)
  return str(path)


@pytest.fixture(scope="module")
def dl19_queries(data_dir):
  from rrjax.data.inputs import load_inputs

  return load_inputs(str(data_dir / "trec" / "BM25.dl19.top100.rankgpt.json.gz")).queries


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  def __init__(self, model: str, *flags: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(os.devnull, "w")
    cmd = [sys.executable, "-m", "rrjax.serve", "--model", model, "--port", str(self.port), *flags]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.client = httpx.Client(base_url=self.url, timeout=120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
      try:
        if self.client.get("/health").status_code == 200:
          return
      except httpx.TransportError:
        time.sleep(0.2)
    raise AssertionError("the server did not answer /health within 120 s")

  def metric(self, name: str) -> float:
    """The sum of a metric's samples (all labels), or one sample when `name` has its labels."""
    total = 0.0
    for line in self.client.get("/metrics").text.splitlines():
      key, _, value = line.rpartition(" ")
      if key == name or ("{" not in name and key.startswith(name + "{")):
        total += float(value)
    return total

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self.client.close()


@pytest.fixture(scope="module")
def server(digits_dir):
  s = Server(digits_dir, *SETTINGS, "--max-new-tokens", "16", "--max-documents", "20", "--max-query-chars", "500",
             "--max-document-chars", "3000", "--max-body-bytes", "100000", "--request-timeout-s", "120")
  yield s
  s.stop()


@pytest.fixture(scope="module")
def strict_server(digits_dir):
  """Two windows queued at most, a 2 s deadline, long generations: 429, 504 and disconnects."""
  s = Server(digits_dir, *SETTINGS, "--max-new-tokens", "400", "--max-queued-windows", "2",
             "--request-timeout-s", "2")
  yield s
  s.stop()


def _request(q, n=15, **kw):
  return {"query": q.text, "documents": [c.doc["text"] for c in q.candidates[:n]], **kw}


# ---------------------------------------------------------------- shapes


def test_endpoint_shapes(server, dl19_queries):
  c = server.client
  assert c.get("/health").json()["status"] == "ok"
  models = c.get("/v1/models").json()
  assert models["object"] == "list" and models["data"][0]["id"] and models["data"][0]["object"] == "model"
  r = c.post("/v1/rerank", json=_request(dl19_queries[0]))
  assert r.status_code == 200, r.text
  out = r.json()
  assert out["id"].startswith("rerank-") and out["model"]
  u = out["usage"]
  assert u["prompt_tokens"] > 100 and u["completion_tokens"] == 2 * 16 and u["total_tokens"] == u["prompt_tokens"] + 32
  assert sorted(x["index"] for x in out["results"]) == list(range(15))
  scores = [x["relevance_score"] for x in out["results"]]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == 15  # strictly decreasing with the rank
  assert scores == [1 - k / 15 for k in range(15)]
  assert "document" not in out["results"][0] and "reasoning" not in out
  assert [x["index"] for x in out["results"]] != list(range(15))  # the model moved documents
  metrics = c.get("/metrics")
  assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
  for name in ("rrjax_requests_total", "rrjax_windows_total", "rrjax_generated_tokens_total", "rrjax_slot_occupancy",
               "rrjax_queued_windows", "rrjax_request_seconds_bucket"):
    assert name in metrics.text, name
  assert server.metric("rrjax_requests_total") >= 1 and server.metric("rrjax_windows_total") >= 2
  assert 0 < server.metric("rrjax_slot_occupancy") <= 1


def test_top_n_documents_reasoning_and_aliases(server, dl19_queries):
  c = server.client
  q = dl19_queries[1]
  full = c.post("/v1/rerank", json=_request(q)).json()["results"]
  for path in ("/rerank", "/v2/rerank"):
    out = c.post(path, json=_request(q, top_n=3, return_documents=True, reasoning=True)).json()
    assert [x["index"] for x in out["results"]] == [x["index"] for x in full[:3]]
    assert [x["document"] for x in out["results"]] == [{"text": q.candidates[x["index"]].doc["text"]}
                                                       for x in out["results"]]
    assert [(w["start"], w["end"]) for w in out["reasoning"]] == [(5, 15), (0, 10)]  # back to front
    assert all(w["text"] and w["parser"] for w in out["reasoning"])
  # Per-request windows: one window of 15 ranks differently from two of 10.
  one = c.post("/v1/rerank", json=_request(q, window_size=15, stride=15, max_new_tokens=8, reasoning=True)).json()
  assert [(w["start"], w["end"]) for w in one["reasoning"]] == [(0, 15)] and one["usage"]["completion_tokens"] == 8


def test_cohere_and_jina_bodies(server):
  docs = ["Fleas live up to a year.", "Cats groom.", "A flea's life cycle has four stages.", "Dogs bark."]
  cohere = {"model": "rerank-english-v3.0", "query": "flea life cycle", "documents": [{"text": d} for d in docs],
            "top_n": 2, "return_documents": True, "max_chunks_per_doc": 10}
  jina = {"model": "jina-reranker-v2-base-multilingual", "query": "flea life cycle", "documents": docs, "top_n": 2,
          "return_documents": True}
  a, b = (server.client.post("/v1/rerank", json=body) for body in (cohere, jina))
  assert a.status_code == b.status_code == 200, (a.text, b.text)
  assert a.json()["results"] == b.json()["results"] and len(a.json()["results"]) == 2
  assert a.json()["model"] == "rerank-english-v3.0"
  titled = server.client.post("/v1/rerank", json={"query": "q", "documents": [{"title": "T", "text": "x"}, "y"],
                                                  "return_documents": True}).json()
  assert {"title": "T", "text": "x"} in [r["document"] for r in titled["results"]]


# ---------------------------------------------------------------- one engine for concurrent clients


def _cli_orders(model, queries, tmp_path, dl19_rankgpt) -> dict[str, list[str]]:
  from rrjax import rerank as rr

  out = tmp_path / "cli.trec"
  assert rr.main(["--model", model, "--corpus", dl19_rankgpt, "--out", str(out), "--max-queries", str(len(queries)),
                  "--top-k", "15", "--max-new-tokens", "16", "--no-progress", *SETTINGS]) == 0
  orders: dict[str, list[tuple[int, str]]] = {}
  for line in out.read_text().splitlines():
    qid, _, docid, rank, _, _ = line.split()
    orders.setdefault(qid, []).append((int(rank), docid))
  return {q: [d for _, d in sorted(v)] for q, v in orders.items()}


@pytest.mark.slow
def test_sixteen_clients_rank_as_the_cli(server, digits_dir, dl19_queries, data_dir, tmp_path):
  """64 requests from 16 concurrent clients: all 200, each ranking equal to `python -m rrjax.rerank` on the
  same query and documents (greedy: a request's windows do not depend on the other traffic)."""
  queries = dl19_queries[:8]
  expected = _cli_orders(digits_dir, queries, tmp_path, str(data_dir / "trec" / "BM25.dl19.top100.rankgpt.json.gz"))
  assert sum(v != [c.docid for c in q.candidates[:15]] for q, v in zip(queries, expected.values())) >= 4

  def ask(k):
    q = queries[k % len(queries)]
    with httpx.Client(base_url=server.url, timeout=300) as c:
      r = c.post("/v1/rerank", json=_request(q))
    assert r.status_code == 200, r.text
    return q.qid, [q.candidates[x["index"]].docid for x in r.json()["results"]]

  windows = server.metric("rrjax_windows_total")
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    got = list(pool.map(ask, range(64)))
  assert len(got) == 64
  for qid, order in got:
    assert order == expected[qid], qid
  assert server.metric("rrjax_windows_total") - windows == 128


# ---------------------------------------------------------------- bad input


BAD = [  # (name, body or (raw bytes, content type), status, the field the message names)
    ("missing query", {"documents": ["a"]}, 422, "query"),
    ("empty documents", {"query": "q", "documents": []}, 400, "documents"),
    ("non-string document", {"query": "q", "documents": ["a", 5]}, 422, "documents.1"),
    ("document without text", {"query": "q", "documents": [{"title": "t"}]}, 422, "documents.0"),
    ("documents not a list", {"query": "q", "documents": "a b c"}, 422, "documents"),
    ("too many documents", {"query": "q", "documents": ["a"] * 21}, 413, "documents"),
    ("oversized body", {"query": "q", "documents": ["a" * 2900] * 19 + ["x" * 50_000]}, 413, "body"),
    ("query too long", {"query": "q" * 501, "documents": ["a"]}, 413, "query"),
    ("document too long", {"query": "q", "documents": ["a", "b" * 3001]}, 413, "documents.1"),
    ("query of the wrong type", {"query": 7, "documents": ["a"]}, 422, "query"),
    ("top_n a string", {"query": "q", "documents": ["a"], "top_n": "3"}, 422, "top_n"),
    ("negative top_n", {"query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    ("zero top_n", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("return_documents not a bool", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 422,
     "return_documents"),
    ("unknown field", {"query": "q", "documents": ["a"], "window": 4}, 422, "window"),
    ("blank query", {"query": "   ", "documents": ["a"]}, 400, "query"),
    ("max_new_tokens over the server's", {"query": "q", "documents": ["a"], "max_new_tokens": 17}, 400,
     "max_new_tokens"),
    ("stride over window_size", {"query": "q", "documents": ["a", "b"], "window_size": 2, "stride": 3}, 400,
     "stride"),
    ("a JSON array", [{"query": "q"}], 422, "body"),
    ("invalid JSON", (b'{"query": "q", "documents": [', "application/json"), 400, "body"),
    ("wrong content type", (b'{"query": "q", "documents": ["a"]}', "text/plain"), 415, "content-type"),
]


@pytest.mark.parametrize("name, body, status, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_field(server, name, body, status, field):
  if isinstance(body, tuple):
    r = server.client.post("/v1/rerank", content=body[0], headers={"content-type": body[1]})
  else:
    r = server.client.post("/v1/rerank", json=body)
  assert r.status_code == status, (name, r.status_code, r.text)
  detail = r.json()["detail"]
  assert isinstance(detail, str) and "\n" not in detail and detail.startswith(field), detail


def test_the_server_answers_after_bad_input(server):
  assert server.client.get("/health").status_code == 200
  assert server.client.get("/v1/rerank").status_code == 405
  assert server.metric('rrjax_requests_total{status="422"}') >= 7
  r = server.client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
  assert r.status_code == 200 and server.proc.poll() is None


# ---------------------------------------------------------------- limits


def test_queue_full_is_429_and_a_deadline_504(strict_server, dl19_queries):
  s = strict_server
  slow = {}

  def long_request():  # two windows of 400 tokens (and the first compile): past the 2 s deadline
    with httpx.Client(base_url=s.url, timeout=60) as c:
      slow["r"] = c.post("/v1/rerank", json=_request(dl19_queries[0]))

  t = threading.Thread(target=long_request)
  t.start()
  deadline = time.monotonic() + 30
  while s.metric("rrjax_pending_windows") < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  r = s.client.post("/v1/rerank", json=_request(dl19_queries[1], n=5))
  assert r.status_code == 429 and r.json()["detail"].startswith("queue:"), r.text
  assert int(r.headers["Retry-After"]) >= 1
  t.join()
  assert slow["r"].status_code == 504 and slow["r"].json()["detail"].startswith("request_timeout"), slow["r"].text
  assert s.metric("rrjax_pending_windows") == 0 and s.metric("rrjax_cancelled_requests_total") >= 1
  too_big = s.client.post("/v1/rerank", json=_request(dl19_queries[1], n=30))  # 5 windows: never fits
  assert too_big.status_code == 400 and too_big.json()["detail"].startswith("documents:")


def test_a_client_that_leaves_has_its_windows_cancelled(strict_server, dl19_queries):
  s = strict_server
  cancelled = s.metric("rrjax_cancelled_requests_total")
  with pytest.raises(httpx.ReadTimeout):
    httpx.post(f"{s.url}/v1/rerank", json=_request(dl19_queries[2]), timeout=0.5)
  deadline = time.monotonic() + 10
  while s.metric("rrjax_cancelled_requests_total") == cancelled and time.monotonic() < deadline:
    time.sleep(0.1)
  assert s.metric("rrjax_cancelled_requests_total") == cancelled + 1
  assert s.metric("rrjax_pending_windows") == 0 and s.client.get("/health").status_code == 200


@pytest.mark.slow
def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(digits_dir, dl19_queries):
  s = Server(digits_dir, *SETTINGS, "--max-new-tokens", "16")
  try:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      futures = [pool.submit(httpx.post, f"{s.url}/v1/rerank", json=_request(q), timeout=120)
                 for q in dl19_queries[:6]]
      deadline, pending = time.monotonic() + 30, 0.0
      while pending < 12 and time.monotonic() < deadline:  # all six accepted (two windows each), none answered
        time.sleep(0.02)
        pending = s.metric("rrjax_pending_windows")
      assert pending > 0
      s.proc.send_signal(signal.SIGTERM)
      statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 6
    assert s.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
      httpx.get(f"{s.url}/health", timeout=2)
  finally:
    s.stop()


@pytest.mark.parametrize("flags, message", [
    (["--gin_param", "RerankSettings.windw = 3"], "rrjax.serve: error: gin binding 'RerankSettings.windw = 3': "
     "unknown RerankSettings field(s) windw"),
    (["--max-documents", "101"], "rrjax.serve: error: --max-documents 101 exceeds RerankSettings.top_k 100"),
    (["--gin_param", "RerankSettings.mode = 'pointwise'"], "rrjax.serve: error: mode: the server runs listwise"),
])
def test_bad_flags_are_one_line_and_exit_2(digits_dir, flags, message):
  proc = subprocess.run([sys.executable, "-m", "rrjax.serve", "--model", digits_dir, "--port", str(_free_port()),
                         *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]


# ---------------------------------------------------------------- the library


def _readme_snippet() -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  block = re.search(r"<!-- reranker-snippet -->\s*```python\n(.*?)```", text, re.S)
  assert block, "README.md lost its Reranker snippet"
  return block.group(1)


def test_readme_reranker_snippet_runs(digits_dir, tmp_path):
  code = _readme_snippet().replace('"path/to/model"', repr(digits_dir))
  assert repr(digits_dir) in code
  # As a user's plain script runs: no JAX_PLATFORMS or simulated devices, and libtpu (the test extra's)
  # installed on a machine without TPUs must stay quiet.
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env={**env, "PYTHONPATH": ROOT})
  assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) >= 2 and re.match(r"\d+ [01]\.\d+ ", lines[0]), proc.stdout


def test_reranker_async_callers_share_one_engine(digits_dir, dl19_queries):
  import asyncio

  from rrjax.serve import Reranker

  with Reranker.load(digits_dir, window=10, stride=5, max_passage_tokens=30, max_new_tokens=16) as reranker:
    queries = dl19_queries[:4]
    docs = [[c.doc for c in q.candidates[:15]] for q in queries]
    alone = [reranker.rerank(q.text, d) for q, d in zip(queries, docs)]

    async def together():
      return await asyncio.gather(*[reranker.arerank(q.text, d) for q, d in zip(queries, docs)])

    shared = asyncio.run(together())
    batch = reranker.rerank_batch([{"query": q.text, "documents": d, "top_n": 5} for q, d in zip(queries, docs)])
    assert [r.results for r in shared] == [r.results for r in alone]
    assert [r.results for r in batch] == [r.results[:5] for r in alone]
    assert reranker.stats()["engine"]["engines"] == 1  # one engine served all three rounds
    with pytest.raises(ValueError, match="^documents\\[1\\]: a string or an object"):
      reranker.rerank("q", ["a", 3])


def test_cancel_drops_a_queued_window_before_it_is_prefilled(digits_dir, dl19_queries):
  """One slot: B's window waits while A decodes; cancelled, it is never prefilled and A is unaffected."""
  from rrjax.serve import Cancelled, Reranker

  with Reranker.load(digits_dir, window=10, stride=5, max_passage_tokens=30, max_new_tokens=48, batch_size=1) as r:
    a = r.plan(dl19_queries[0].text, [c.doc for c in dl19_queries[0].candidates[:15]])
    b = r.plan(dl19_queries[1].text, [c.doc for c in dl19_queries[1].candidates[:15]])
    fa, fb = r.submit(a), r.submit(b)
    deadline = time.monotonic() + 60
    while r.stats()["windows_queued"] < 1 and time.monotonic() < deadline:
      time.sleep(0.01)
    assert not fb.done() and r.stats()["windows_queued"] >= 1
    r.cancel(b)
    assert r.stats()["windows_left"] == a.windows.left  # B stops counting at once
    with pytest.raises(Cancelled):
      fb.result(timeout=60)
    assert len(fa.result(timeout=120).windows) == 2
    stats = r.stats()
    assert stats["windows"] == 2 and stats["engine"]["prefill_rows"] == 2 and stats["cancelled"] == 1


def test_reranker_loads_a_gin_file_naming_its_model(digits_dir, tmp_path):
  from rrjax.serve import Reranker

  gin = tmp_path / "serve.gin"
  gin.write_text(f"Reranker.model = {digits_dir!r}\nRerankSettings.window = 10\nRerankSettings.max_new_tokens = 8\n")
  with Reranker.load(str(gin), stride=5) as r:
    assert (r.settings.window, r.settings.stride, r.settings.max_new_tokens) == (10, 5, 8) and r.name == digits_dir
  (tmp_path / "nomodel.gin").write_text("RerankSettings.window = 10\n")
  with pytest.raises(ValueError, match="Reranker.model"):
    Reranker.load(str(tmp_path / "nomodel.gin"))
  with pytest.raises(ValueError, match="unknown RerankSettings field"):
    Reranker.load(digits_dir, windw=3)
