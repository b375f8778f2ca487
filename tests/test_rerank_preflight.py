"""python -m rrjax.preflight --model: a rerank's engine programs (prefill, insert, decode; Rank1's scoring pass)
compiled ahead of time for its slots and lengths on cpu:N and on the real TPU compiler, its mesh, and the
shipped 7B/32B serving configs (compile only: nothing is allocated or run)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from test_preflight import _gin, _preflight
from rrjax import preflight
from rrjax import tokenizer as tokenizer_lib
from rrjax.data import trec
from rrjax.model.qwen2 import Qwen2Config
from rrjax.ranking.prompt import build_prompt
from rrjax.rerank import cli
from rrjax.rerank import preflight as rerank_preflight
from rrjax.rerank.settings import RerankSettings
from rrjax.sharding import MeshConfig

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["RerankSettings.top_k = 30", "RerankSettings.window = 10", "RerankSettings.stride = 5",
         "RerankSettings.max_passage_tokens = 48", "RerankSettings.max_new_tokens = 200"]


def test_longest_window_bounds_real_windows(data_dir):
  """The computed longest window is at least every real DL19 window of the same settings, and close to the
  longest of them when the passages are long enough to be cut."""
  tok = tokenizer_lib.load()
  topics, run, docs = trec.read_rankgpt(data_dir / "trec" / "BM25.dl19.top100.rankgpt.json.gz")
  s = RerankSettings(window=10, max_passage_tokens=48)
  real = []
  for qid in list(run)[:8]:
    ids = list(run[qid])[:30]
    for start in range(0, 30, 10):
      text = build_prompt(topics[qid], [docs[d] for d in ids[start:start + 10]], tok, max_passage_tokens=48)
      real.append((len(tok.encode(text)), len(tok.encode(topics[qid]))))
  longest, query = max(real)
  bound = rerank_preflight.longest_prompt(s, tok, query_tokens=query)
  assert bound >= longest and bound <= 1.1 * longest, (bound, longest)
  assert rerank_preflight.longest_prompt(s, tok, query_tokens=query + 100) >= bound + 200  # the query is in twice
  full = rerank_preflight.longest_prompt(RerankSettings(mode="full", top_k=30, max_passage_tokens=48), tok, 20)
  assert full > 2.2 * rerank_preflight.longest_prompt(s, tok, 20)


@pytest.mark.parametrize("mesh", [(2, 1, 2), (4, 1, 1)])
def test_listwise_programs_hold_weights_and_sharded_cache(mesh):
  """cpu:4 with GPU settings: the compiled programs' arguments are the weights (replicated over data, split over
  tensor) plus the slot cache (split over slots by data and over kv heads by tensor), as the engine lays them out."""
  rep, source = preflight.run_rerank([], [*SMALL, "RerankSettings.mesh = @MeshConfig()",
                                          f"MeshConfig.data = {mesh[0]}", f"MeshConfig.tensor = {mesh[2]}"],
                                     "cpu:4", "tiny", hbm_gib=4, devices=jax.devices("cpu")[:4], num_queries=6)
  assert source == "preset tiny" and rep["fits"] and rep["platform"] == "gpu"
  assert rep["mesh"] == {"data": mesh[0], "fsdp": 1, "tensor": mesh[2]}
  assert [p["name"] for p in rep["programs"]] == ["prefill", "insert", "decode"]
  r = rep["rerank"]
  assert r["mode"] == "listwise" and r["schedule"] == "async" and r["dtype"] == "bfloat16" and r["hosts"] == 1
  assert r["slots"] == 8 and r["slots"] % mesh[0] == 0  # 6 windows in flight, bucketed up, whole rows per shard
  assert r["slot_length"] >= r["prompt_tokens"] * 1.25 + 200 and r["prefill_prompt"] >= r["prompt_tokens"]
  c = Qwen2Config.tiny()
  tensor = mesh[2]
  weights = c.param_count() * 2  # bf16
  cache = 2 * c.num_layers * (r["slots"] // mesh[0]) * r["slot_length"] * (c.num_kv_heads // tensor) * c.head_dim * 2
  decode = rep["programs"][2]
  # Sharded weights land between a tensor share of everything and all of the norms/biases replicated.
  assert weights / tensor + cache <= decode["argument_bytes"] <= weights / tensor * 1.1 + cache + 2**20, decode
  assert decode["alias_bytes"] >= cache  # the cache is donated and updated in place
  # The plan's estimate (what the run checks before it allocates) is close to the compiler's measure.
  peak = rep["peak_bytes"]
  assert 0.8 * peak <= r["estimate_bytes"] <= 2.0 * peak, (r["estimate_bytes"], peak)


def test_pointwise_has_the_scoring_pass():
  rep, _ = preflight.run_rerank([], ["RerankSettings.mode = 'pointwise'", "RerankSettings.top_k = 20",
                                     "RerankSettings.max_passage_tokens = 64", "RerankSettings.max_new_tokens = 100"],
                                "cpu:2", "tiny", hbm_gib=4, devices=jax.devices("cpu")[:2], num_queries=3,
                                query_tokens=16)
  assert [p["name"] for p in rep["programs"]] == ["prefill", "insert", "decode", "score_prefill", "score_insert",
                                                  "score_decode"]
  r = rep["rerank"]
  assert r["prompts_per_call"] == 60 and r["slots"] == 64  # 3 queries x 20 passages, bucketed
  # The scoring pass continues prompt + reasoning: its slots hold the reasoning budget, one step past it.
  assert r["score_prefill_prompt"] >= r["prompt_tokens"] + 100 and r["score_slot_length"] == r["score_prefill_prompt"] + 1


def test_default_mesh_follows_the_model_size():
  """Replicas when the weights fit a device beside a cache, else the fewest tensor-parallel devices that hold
  them (7B bf16 on 16 GiB chips: 2; 32B: 8), the rest replicas."""
  cpus = jax.devices("cpu")
  for preset, n, hbm, want in [("qwen2_5_7b", 4, 16, (2, 1, 2)), ("qwen2_5_32b", 8, 16, (1, 1, 8)),
                               ("qwen2_5_7b", 8, 80, (8, 1, 1)), ("qwen2_5_32b", 2, 80, (1, 1, 2))]:
    arch = Qwen2Config.preset(preset)
    mesh = cli.mesh_for(arch, None, "bfloat16", cpus[:n], memory_limit_bytes=hbm * GiB)
    assert tuple(map(int, mesh.axis_sizes)) == want, (preset, n, hbm)
  mesh = cli.mesh_for(None, MeshConfig(data=1, fsdp=1, tensor=2), "bfloat16", cpus[:8])
  assert mesh.devices.size == 2  # an explicit mesh takes its first D*F*T devices
  with pytest.raises(ValueError, match="needs 16 devices"):
    cli.mesh_for(None, MeshConfig(data=2, fsdp=1, tensor=8), "bfloat16", cpus[:8])


def test_cli_exits_1_when_no_slot_fits_and_2_on_bad_input():
  proc, rep = _preflight("--model", "tiny", *_gin(SMALL), "--topology", "cpu:2", "--hbm", "0.001", "--json")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and rep["fits"] is False, proc.stderr[-2000:]
  assert len(err) == 1 and err[0].startswith("rrjax.preflight: does not fit:") and "1 slot" in err[0], err
  proc, _ = _preflight("--model", "qwen9_banana", "--topology", "cpu:2")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1 and "qwen9_banana" in err[0], proc.stderr
  proc, _ = _preflight("--model", "tiny", "--gin_param", "RerankSettings.windw = 3", "--topology", "cpu:2")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1 and "windw" in err[0], proc.stderr


def test_tpu_eight_chip_v5e_is_one_host_and_v5p_hosts_have_four():
  """A rerank's mesh spans one host (each host reranks its share): v5e/v6e slices of up to 8 chips are one
  host, as their 8-chip VMs are; v5p hosts have 4 chips."""
  code = ("from rrjax import preflight\n"
          "for t in ('v5e:2x2', 'v5e:2x4', 'v6e:2x4', 'v5p:2x2x2', 'v5e:4x4'):\n"
          "  d = preflight.tpu_devices(t)\n"
          "  print(t, len(d), len({x.process_index for x in d}))\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = dict((line.split()[0], tuple(map(int, line.split()[1:]))) for line in proc.stdout.splitlines())
  assert got == {"v5e:2x2": (4, 1), "v5e:2x4": (8, 1), "v6e:2x4": (8, 1), "v5p:2x2x2": (8, 2), "v5e:4x4": (16, 4)}


@pytest.mark.slow
def test_shipped_7b_serving_config_fits_v5e_2x2():
  """Qwen2.5-7B, BRIGHT's settings (20 passages of 512 tokens, 3,172 new tokens), with the config's mesh (data 2
  x tensor 2) on v5e:2x2: the real TPU compiler's measure of the engine's programs fits 16 GiB chips (the
  compiler's 15.75 GiB) with room for at least 8 slots of 20,480 positions."""
  proc, rep = _preflight("--model", "qwen2_5_7b", "--gin_file", "rerank/reasonrank_7b_v5e.gin",
                         "--topology", "v5e:2x2", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "WARNING: could not determine" not in proc.stderr  # libtpu's probe is kept quiet
  assert rep["platform"] == "tpu" and rep["device_kind"] == "TPU v5 lite" and rep["warnings"] == []
  assert rep["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  r = rep["rerank"]
  assert r["hosts"] == 1 and r["mode"] == "listwise" and r["prompt_tokens"] > 20 * 512
  assert r["slot_length"] % 8 == 0  # whole pages for the ragged paged decode kernel
  assert rep["fits"] and rep["peak_bytes"] < 15.75 * GiB and r["slots"] >= 8 and r["slot_length"] >= 20000
  params = Qwen2Config.qwen2_5_7b().param_count()
  decode = next(p for p in rep["programs"] if p["name"] == "decode")
  assert params * 2 / 2 < decode["argument_bytes"]  # half the bf16 weights per chip, plus the cache
