"""rrjax.engine: slots refilled as rows finish give each request exactly what it gets alone (greedy and
sampled), whatever the slot count, arrival order, neighbours or mesh; early exit; a bounded program set;
the paged (TPU) layout and kernel wiring; ahead-of-time TPU compiles; the memory plan."""

import dataclasses

import numpy as np
import pytest

import hf_reference
from rrjax import decode, engine, sharding
from rrjax.engine import memory, programs
from rrjax.model import attention
from rrjax.model.qwen2 import Qwen2Config
from rrjax.sampling import Sampling

CONFIG = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, tie_word_embeddings=False)
LENGTH = 96
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 97, n).tolist() for n in (5, 1, 23, 9, 40, 3, 17, 12, 31, 2)]
BUDGETS = [12, 1, 20, 7, 16, 24, 3, 18, 9, 14]
STOP = (79, 13)


def _torch_model(config, seed=0):
  return hf_reference.varied_model(config, seed)


@pytest.fixture(scope="module")
def ref():
  return _torch_model(CONFIG)


@pytest.fixture(scope="module")
def model(ref):
  return hf_reference.rrjax_twin(ref, CONFIG)


def _requests(order, **kw):
  return [engine.Request(PROMPTS[i], BUDGETS[i], stop_ids=STOP, id=i, **kw) for i in order]


@pytest.fixture(scope="module")
def alone(model):
  """Each prompt generated on its own (one slot, one request)."""
  return [decode.generate(model, [p], max_new_tokens=n, stop_ids=STOP) for p, n in zip(PROMPTS, BUDGETS)]


def _by_id(results):
  return {r.request.id: r for r in results}


@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_greedy_equals_single_prompt_generation(model, alone, slots):
  order = np.random.default_rng(slots).permutation(len(PROMPTS))
  eng = engine.Engine(model, engine.EngineConfig(slots=slots, length=LENGTH, steps_per_call=5))
  got = _by_id(eng.run(_requests(order)))
  for i, single in enumerate(alone):
    assert got[i].tokens == single.tokens[0], i
    assert got[i].finish_reason == single.finish_reasons[0]
    np.testing.assert_allclose(got[i].logprobs, single.logprobs[0], atol=1e-5)
  assert {r.finish_reason for r in got.values()} == {"stop", "length"}
  assert len(got[1].tokens) == 1  # a budget of one: the prefill's token, no decode step
  assert eng.stats.generated_tokens == sum(len(r.tokens) for r in got.values())
  if slots < len(PROMPTS):
    assert eng.stats.prefill_calls > 1  # slots were refilled


def test_refilled_slot_leaks_no_stale_keys(model):
  long = engine.Request(RNG.integers(0, 97, 60).tolist(), 30, id=0, priority=0)
  short = engine.Request([7, 3, 5], 20, id=1, priority=1)
  used = engine.Engine(model, engine.EngineConfig(slots=1, length=LENGTH, return_logits=True))
  after_long = used.run([long, short])[1]
  fresh = engine.Engine(model, engine.EngineConfig(slots=1, length=LENGTH, return_logits=True)).run([short])[0]
  assert after_long.tokens == fresh.tokens
  np.testing.assert_array_equal(after_long.logits, fresh.logits)
  np.testing.assert_array_equal(after_long.logprobs, fresh.logprobs)


def test_sampled_tokens_do_not_depend_on_slots_or_order(model, alone):
  kw = dict(temperature=1.0, top_p=0.9, seed=5)
  mode = Sampling(1.0, 20, 0.9)
  runs = []
  for slots, order in ((1, range(10)), (3, range(9, -1, -1)), (3, np.random.default_rng(1).permutation(10))):
    eng = engine.Engine(model, engine.EngineConfig(slots=slots, length=LENGTH, sampling=mode, steps_per_call=4))
    got = _by_id(eng.run(_requests(order, **kw)))
    runs.append([got[i].tokens for i in range(10)])
  assert runs[0] == runs[1] == runs[2]
  assert runs[0] != [g.tokens[0] for g in alone]  # sampled, not greedy
  other = _by_id(eng.run(_requests(range(10), **{**kw, "seed": 6})))
  assert runs[0] != [other[i].tokens for i in range(10)]


def test_copies_share_one_prefill(model):
  mode = Sampling(1.0)
  prompt = PROMPTS[2]
  separate = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, sampling=mode))
  want = [r.tokens for r in separate.run([engine.Request(prompt, 15, temperature=1.0, id=10 + j) for j in range(6)])]
  assert separate.stats.prefill_rows == 6
  # 6 copies over 4 slots: two rounds
  shared = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, sampling=mode))
  got = shared.run([engine.Request(prompt, 15, temperature=1.0, id=10, copies=6)])
  assert [r.copy for r in got] == list(range(6)) and [r.tokens for r in got] == want
  assert shared.stats.prefill_rows == 2 and len({tuple(t) for t in want}) > 1


def test_decode_returns_when_a_row_finishes_and_programs_stay_bounded(model):
  eng = engine.Engine(model, engine.EngineConfig(slots=2, length=LENGTH, steps_per_call=50), leave_early=True)
  for r in (engine.Request(PROMPTS[0], 3, id=0), engine.Request(PROMPTS[2], 40, id=1)):
    eng.submit(r)
  first = eng.step()
  assert [(r.request.id, len(r.tokens)) for r in first] == [(0, 3)]
  assert eng.stats.decode_calls == 1 and eng.stats.decode_steps == 2  # the first token comes from prefill
  rest = []
  while not eng.idle():
    rest += eng.step()
  assert [(r.request.id, len(r.tokens)) for r in rest] == [(1, 40)]

  # Many ragged requests: at most one decode program, one insert per prefill group size, one prefill per
  # (group size, prompt bucket); a second identical run compiles nothing.
  buckets = programs.Buckets(min_prompt=16)
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 70, 24)
  reqs = [engine.Request(rng.integers(0, 97, n).tolist(), int(rng.integers(1, 25)), stop_ids=STOP, id=i)
          for i, n in enumerate(lengths)]
  before = engine.compilation_count()
  eng = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, buckets=buckets, steps_per_call=8))
  out = eng.run(reqs)
  groups = 3  # prefill group sizes 1, 2, 4
  prompt_buckets = len({buckets.prompt(int(n)) for n in lengths})
  compiled = engine.compilation_count() - before
  assert 3 <= compiled <= 1 + groups + groups * prompt_buckets, (compiled, prompt_buckets)
  again = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, buckets=buckets, steps_per_call=8))
  assert [r.tokens for r in again.run(reqs)] == [r.tokens for r in out]
  assert engine.compilation_count() - before == compiled
  assert 0.0 < eng.stats.occupancy <= 1.0


def test_chunked_prefill_and_paged_layout_match(model):
  long = [RNG.integers(0, 97, n).tolist() for n in (600, 300, 520)]
  reqs = [engine.Request(p, 6, id=i) for i, p in enumerate(long)]
  config = engine.EngineConfig(slots=2, length=800, return_logits=True)
  whole = engine.Engine(model, config).run(reqs)
  chunked = engine.Engine(model, dataclasses.replace(config, prefill_chunk=256)).run(reqs)
  paged = engine.Engine(model, dataclasses.replace(config, cache_layout="paged")).run(reqs)
  for a, b, c in zip(whole, chunked, paged):
    assert a.tokens == b.tokens == c.tokens
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    np.testing.assert_array_equal(c.logits, a.logits)


@pytest.mark.parametrize("queries", [1, 2])
def test_ragged_paged_kernel_wiring_matches_xla(queries):
  """The TPU kernel's own reference run on our paged view of the contiguous cache (pages of every layer,
  slot pages found by layer offset) equals the length-masked XLA attention."""
  import jax.numpy as jnp

  rng = np.random.default_rng(queries)
  L, B, S, K, N, H = 3, 4, 32, 2, 4, 16
  kv = jnp.asarray(rng.normal(size=(L, B, S, 2 * K, H)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(B, queries, N, H)), jnp.float32)
  lengths = jnp.asarray([5, 32, 17, queries], jnp.int32)
  for layer in (0, 2):
    want = attention.attend_slots(q, kv, None, layer, lengths, kernel="xla")
    got = attention._attend_ragged(q, kv, layer, lengths, reference=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_sharded_engine_matches_single_device(ref, model):
  """Slots over data x fsdp, kv heads over tensor; refills, copies and sampling as on one device (the greedy
  parity of rrjax.generate on this mesh is in test_decode)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = hf_reference.rrjax_twin(ref, CONFIG, mesh=mesh)
  mode, kw = Sampling(1.0, 20), {"temperature": 1.0, "seed": 2}
  reqs = _requests(range(6), **kw) + [engine.Request(PROMPTS[4], 9, id=20, copies=3, **kw)]
  single = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, sampling=mode)).run(reqs)
  multi = engine.Engine(sharded, engine.EngineConfig(slots=4, length=LENGTH, sampling=mode), mesh=mesh).run(reqs)
  assert [r.tokens for r in multi] == [r.tokens for r in single]
  for a, b in zip(multi, single):
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.mark.parametrize("mesh_shape, layout, chunk", [((2, 2, 2), "split", None), ((2, 2, 2), "paged", 16),
                                                       ((4, 2, 1), "paged", None)])
def test_sharded_prefill_places_rows_without_gathering_them(ref, model, mesh_shape, layout, chunk):
  """On a mesh the prefill's rows, sharded like the slots, reach their slots round a ring of the devices: no
  device gathers every row's prompt keys/values (an all-gather of [L, G, P, ...], 8 rows' prefix on every chip
  of the 32B GRPO recipe), and each row lands in its slots (copies, ids >= B skipped) as on one device: both
  cache layouts, whole or chunked, kv heads over tensor, and rows over fewer axes than the slots (4 rows over
  data 4, 8 slots over data x fsdp)."""
  from rrjax import hlo_count

  rows = 4
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  sharded = hf_reference.rrjax_twin(ref, CONFIG, mesh=mesh)
  config = engine.EngineConfig(slots=8, length=LENGTH, cache_layout=layout)
  P, C = 64, 3
  tokens = np.random.default_rng(1).integers(0, 97, (rows, P)).astype(np.int32)
  lengths = np.array([40, 5, 64, 17][:rows], np.int32)
  dest = np.array([[6, 1, 8], [0, 8, 8], [3, 5, 8], [7, 2, 4]][:rows], np.int32)  # 8 = B: skipped
  out = []
  for m, on in ((model, None), (sharded, mesh)):
    eng = engine.Engine(m, config, mesh=on)
    prefill = eng.programs.prefill(eng.params, rows, P, C, chunk)
    cache, logits = prefill(eng.params, eng.cache, *map(eng._put, (tokens, lengths, dest)))
    out.append((cache, logits))
  gathered = [dims for ins in map(hlo_count._parse_instr, prefill.as_text().splitlines())
              if ins is not None and ins.opcode in ("all-gather", "all-gather-start") for _, dims, _ in ins.arrays()]
  prefixes = [d for d in gathered if d[:1] == (CONFIG.num_layers,) and P in d]  # [L, G, P, K, H] gathered
  assert gathered and not prefixes, prefixes
  (single, single_logits), (multi, multi_logits) = out
  for a, b in zip(multi, single):
    if b is not None:
      assert np.asarray(b).any() and not np.asarray(b)[:, [s for s in range(8) if s not in dest]].any()
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  np.testing.assert_allclose(np.asarray(multi_logits), np.asarray(single_logits), atol=1e-4)


def test_tpu_programs_compile_ahead_of_time():
  """prefill (splash), insert and decode (ragged paged attention) lowered by Mosaic and compiled by the TPU
  compiler of the libtpu wheel for a v5e 2x2 slice, on this CPU (nothing runs)."""
  import jax
  from flax import nnx
  from jax.experimental import topologies

  from rrjax import hardware
  from rrjax.model.qwen2 import Qwen2

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2), devices=devices)
  config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=128, tie_word_embeddings=True, dtype="bfloat16",
                       param_dtype="bfloat16")
  with hardware.target_platform("tpu"):
    with jax.set_mesh(mesh):
      abstract = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    graphdef, params = sharding.abstract_state(abstract, mesh)
    kernel = engine.decode_kernel(config, "bfloat16", mesh)
    assert kernel == "ragged" and engine.default_cache_dtype(config) == "bfloat16"
    spec = programs.Spec(graphdef, config, mesh, slots=8, length=512, cache_dtype="bfloat16", kernel=kernel,
                         sampling=Sampling(1.0, 20, 0.9).static_key(), steps=16)
    progs = programs.Programs(spec)
    prefill = progs.prefill(params, 4, 256, copies=2)
    insert = progs.insert(4, 8)
    decode_program = progs.decode(params)
  assert "splash" in prefill.as_text() and "ragged_paged_attention" in decode_program.as_text()
  for compiled in (prefill, insert, decode_program):
    assert "tpu_custom_call" in compiled.as_text() or compiled is insert


def test_memory_plan_fits_the_budget_and_bounds_the_programs(model, monkeypatch):
  """The plan takes as many slots and prefill rows as the budget holds, its estimate bounds what the
  compiled programs allocate, and what cannot fit at one slot is refused before anything is allocated."""
  from flax import nnx

  from rrjax.model.qwen2 import Qwen2

  big = Qwen2(Qwen2Config.tiny(vocab_size=512), rngs=nnx.Rngs(0))  # prefill attention dominates at 2k tokens
  P, N = 2048, 32
  want = engine.EngineConfig(length=P + N)
  roomy = engine.plan(big, want, prompt_len=P, num_slots=40, memory_limit_bytes=8 * 2**30)
  tight = engine.plan(big, want, prompt_len=P, num_slots=40, memory_limit_bytes=200 * 2**20)
  assert roomy.slots == 64 and roomy.prefill_chunk is None and roomy.prefill_group > tight.prefill_group >= 1
  # A tenth of the budget stays free (fragmentation, runtime buffers): the plan is made for the rest.
  assert tight.estimate.limit == 200 * 2**20 and tight.estimate.total <= 0.9 * tight.estimate.limit
  assert tight.estimate.total <= 200 * 2**20 < engine.estimate(
      big, slots=tight.slots, length=tight.length, prefill_rows=tight.prefill_group, prompt_len=P,
      cache_dtype="float32", memory_limit_bytes=1).total  # it fits only because it prefills in chunks
  eng = engine.Engine(big, tight)
  prefill = eng.programs.prefill(eng.params, tight.prefill_group, P, chunk=tight.prefill_chunk)
  decode_program = eng.programs.decode(eng.params)
  for compiled in (prefill, decode_program):
    m = compiled.memory_analysis()
    assert m.argument_size_in_bytes + m.temp_size_in_bytes <= tight.estimate.total
  # GRPO's rollouts (fixed slots, a budget less the resident state) prefill in chunks as the engine does.
  seen = []
  monkeypatch.setattr(programs.Programs, "jitted", lambda self, params, rows, prompt, copies=1, chunk=None:
                      seen.append((self.spec.slots, rows, chunk)) or [])
  decode.programs(big, 32, P, max_new_tokens=N, num_samples=2, engine=engine.EngineConfig(slots=tight.slots),
                  memory_limit_bytes=200 * 2**20)
  (slots, rows, chunk), = seen
  assert slots == tight.slots and 1 <= rows <= tight.slots // 2 and chunk is not None
  with pytest.raises(memory.DecodeMemoryError, match=r"prompt 3 \(2000 tokens.*does not fit even at 1 slot"):
    engine.plan(big, want, prompt_len=P, memory_limit_bytes=2 * 2**20, what="prompt 3 (2000 tokens, 32 new)")
  with pytest.raises(ValueError, match=r"request 4: 90 prompt \+ 10 new tokens exceed the slot length 96"):
    engine.Engine(model, engine.EngineConfig(slots=1, length=LENGTH)).submit(engine.Request([1] * 90, 10, id=4))


@pytest.mark.skipif(__import__("jax").default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_slot_attention_matches_xla_on_gpu():
  """Decode through cuDNN with key/value lengths (no mask) against XLA's length mask, bf16, on a GPU."""
  from flax import nnx

  from rrjax.model.qwen2 import Qwen2

  config = CONFIG.replace(head_dim=64, dtype="bfloat16", param_dtype="float32")
  reqs = [engine.Request(p, n, id=i) for i, (p, n) in enumerate(zip(PROMPTS, BUDGETS))]
  out = {}
  for kernel in ("cudnn", "xla"):
    model = Qwen2(config.replace(attention=kernel), rngs=nnx.Rngs(0))
    eng = engine.Engine(model, engine.EngineConfig(slots=4, length=LENGTH, return_logits=True))
    assert eng.spec.kernel == kernel
    out[kernel] = eng.run(reqs)
  for a, b in zip(out["cudnn"], out["xla"]):
    n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
    assert n >= min(4, len(a.tokens))  # bf16 rounding may flip a near-tie later on
    np.testing.assert_allclose(a.logits[:n], b.logits[:n], atol=0.1)


def test_programs_hook_builds_the_engine_programs_ahead_of_time(ref):
  """decode.programs (rrjax.preflight's hook): the engine programs generate runs, from an abstract model on a
  mesh, lowered and compiled without allocating anything."""
  import jax
  from flax import nnx

  from rrjax.model.qwen2 import Qwen2

  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(lambda: Qwen2(CONFIG, rngs=nnx.Rngs(0)))
  graphdef, params = sharding.abstract_state(abstract, mesh)
  model = nnx.merge(graphdef, params)
  built = decode.programs(model, 6, 40, max_new_tokens=20, engine=engine.EngineConfig(sampling=Sampling(1.0, 5)),
                          stop_ids=STOP, mesh=mesh)
  assert [name for name, _, _ in built] == ["rollout_prefill", "rollout_insert", "rollout_decode"]
  assert built[0][2][1].shape == (8, 64)  # the prompt tokens: 6 prompts in 8 slots, 40 tokens in a bucket of 64
  for name, fn, args in built:
    with jax.set_mesh(mesh):
      compiled = fn.lower(*args).compile()
    assert compiled.memory_analysis() is not None, name


def test_chunked_prefill_attends_about_the_causal_half():
  """A chunked prefill's chunks attend to a key buffer that grows phase by phase, not to the whole prompt: on an
  attention-bound model its compiled FLOPs (rrjax.hlo_count) stay within 1.3x of the causal useful work (one loop
  over the whole key buffer does 1.78x here)."""
  from flax import nnx

  from rrjax import cost, hlo_count
  from rrjax.model.qwen2 import Qwen2

  config = Qwen2Config.tiny(vocab_size=512)  # 64 wide: attention dominates at 2,048 tokens
  eng = engine.Engine(Qwen2(config, rngs=nnx.Rngs(0)), engine.EngineConfig(slots=2, length=2048 + 32))
  counted = hlo_count.count_hlo(eng.programs.prefill(eng.params, 2, 2048, 1, 256).as_text())
  useful = cost.useful(cost.Work(config, "prefill", 2, 2048, logit_tokens=1))["flops"]
  assert 1.0 <= counted.flops / useful <= 1.3, counted.flops / useful
