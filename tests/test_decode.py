"""rrjax.decode against transformers' generate and full forward passes (torch, float32)."""

import jax
import numpy as np
import pytest
import torch

import hf_reference
from rrjax import decode, sharding
from rrjax.engine import memory as engine_memory
from rrjax.model.qwen2 import Qwen2Config

TOL = 1e-4
CONFIG = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, tie_word_embeddings=False)
PROMPTS = [[5, 17, 3, 88, 41], [7, 2, 9], [12, 60, 61, 62, 30, 31, 1, 4, 8, 20, 50], [33]]
NO_STOP = ()
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: one per XLA compile


def _torch_model(config, seed=0):
  return hf_reference.varied_model(config, seed)


@pytest.fixture(scope="module")
def models():
  ref = _torch_model(CONFIG)
  return ref, hf_reference.rrjax_twin(ref, CONFIG)


def _hf_generate(ref, prompt, n, **kw):
  kw = {"eos_token_id": None, **kw}
  with torch.no_grad():
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
  return out[0, len(prompt):].tolist()


def _full_logits(ref, prompt, generated):
  """Logits that predicted each generated token, from one uncached forward over prompt + generated."""
  seq = list(prompt) + list(generated)
  logits = hf_reference.torch_logits(ref, [seq])[0]
  return logits[len(prompt) - 1:len(seq) - 1]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_matches_transformers_generate(models):
  ref, model = models
  out = decode.generate(model, PROMPTS, max_new_tokens=64, stop_ids=NO_STOP)
  assert out.lengths == [64] * len(PROMPTS) and out.finish_reasons == ["length"] * len(PROMPTS)
  for prompt, tokens in zip(PROMPTS, out.tokens):
    assert tokens == _hf_generate(ref, prompt, 64)
  assert len({t for tokens in out.tokens for t in tokens}) > 10  # not a degenerate repeat


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_step_logits_and_logprobs_match_full_forward(models, temperature):
  ref, model = models
  out = decode.generate(model, PROMPTS, max_new_tokens=12, stop_ids=NO_STOP, temperature=temperature, seed=3,
                        engine=decode.EngineConfig(return_logits=True))
  for prompt, tokens, logprobs, logits in zip(PROMPTS, out.tokens, out.logprobs, out.logits):
    full = _full_logits(ref, prompt, tokens)
    np.testing.assert_allclose(logits, full, atol=TOL)
    expected = _log_softmax(full / (temperature or 1.0))[np.arange(len(tokens)), tokens]
    np.testing.assert_allclose(logprobs, expected, atol=TOL)


def test_stop_ids_and_min_new_tokens_match_transformers(models):
  ref, model = models
  free = decode.generate(model, PROMPTS, max_new_tokens=16, stop_ids=NO_STOP)
  # A stop id that row 0 emits mid-way and at least one other row never emits.
  stop = next(t for t in free.tokens[0][3:] if any(t not in row for row in free.tokens[1:]))
  out = decode.generate(model, PROMPTS, max_new_tokens=16, stop_ids=[stop])
  for row, tokens, reason, free_row in zip(PROMPTS, out.tokens, out.finish_reasons, free.tokens):
    if stop in free_row:
      assert tokens == free_row[:free_row.index(stop) + 1] and reason == "stop"
    else:
      assert tokens == free_row and reason == "length"
  assert {"stop", "length"} <= set(out.finish_reasons)

  first = free.tokens[0].index(stop)
  out = decode.generate(model, PROMPTS, max_new_tokens=16, stop_ids=[stop], min_new_tokens=first + 2)
  for prompt, tokens, length in zip(PROMPTS, out.tokens, out.lengths):
    assert stop not in tokens[:first + 2] and length == len(tokens) >= first + 2
    hf = _hf_generate(ref, prompt, 16, eos_token_id=stop, min_new_tokens=first + 2)
    assert tokens == (hf[:hf.index(stop) + 1] if stop in hf else hf)


def test_sampling_filters_seeds_and_chunking(models):
  _, model = models
  greedy = decode.generate(model, PROMPTS, max_new_tokens=10, stop_ids=NO_STOP).tokens
  run = lambda **kw: decode.generate(model, PROMPTS, max_new_tokens=10, stop_ids=NO_STOP,
                                     **{"temperature": 1.0, "seed": 1, **kw}).tokens
  assert run(top_k=1) == greedy
  assert run(top_p=1e-6) == greedy
  sampled = run()
  assert sampled == run() and sampled != run(seed=2) and sampled != greedy
  # A row's random stream depends on (seed, row, step), not on how rows are batched.
  assert run(engine=decode.EngineConfig(slots=2)) == sampled


def _first_token_frequencies(model, ref, n, **kw):
  prompt = [3, 1, 4, 1, 5]
  out = decode.generate(model, [prompt] * n, max_new_tokens=1, stop_ids=NO_STOP, seed=7, **kw)
  counts = np.bincount([t[0] for t in out.tokens], minlength=ref.config.vocab_size)
  logits = hf_reference.torch_logits(ref, [prompt])[0, -1].astype(np.float64)
  return counts, logits


def _chi_square(counts, probs):
  n = counts.sum()
  assert counts[probs == 0].sum() == 0, "sampled a token the filters exclude"
  keep = probs * n >= 5
  expected = probs[keep] * n
  stat = ((counts[keep] - expected) ** 2 / expected).sum()
  dof = max(int(keep.sum()) - 1, 1)
  assert stat < dof + 6 * np.sqrt(2 * dof) + 10, (stat, dof)


def test_sampled_frequencies_follow_softmax():
  config = CONFIG.replace(vocab_size=12)
  ref = _torch_model(config, seed=1)
  with torch.no_grad():  # flatten the distribution so that many tokens have visible mass
    ref.lm_head.weight.mul_(0.6)
  model = hf_reference.rrjax_twin(ref, config)
  n = 2048
  counts, logits = _first_token_frequencies(model, ref, n, temperature=0.7)
  probs = np.exp(_log_softmax(logits / 0.7))
  assert np.count_nonzero(probs * n >= 5) >= 4
  _chi_square(counts, probs)

  counts, _ = _first_token_frequencies(model, ref, n, temperature=1.0, top_k=3)
  top = np.argsort(-logits)[:3]
  probs = np.zeros_like(logits)
  probs[top] = np.exp(_log_softmax(logits[top]))
  _chi_square(counts, probs)


def test_bucketing_compiles_once_per_bucket(models):
  _, model = models
  buckets = decode.Buckets(min_batch=4, min_prompt=16, min_new_tokens=8)
  assert (buckets.batch(3), buckets.prompt(12), buckets.prompt(17), buckets.prompt(25)) == (4, 16, 24, 32)
  assert buckets.batch(3, multiple=4) == 4 and buckets.batch(5, multiple=4) == 8
  run = lambda prompts, n: decode.generate(model, prompts, max_new_tokens=n, stop_ids=[96],
                                                  engine=decode.EngineConfig(buckets=buckets))
  run([[1] * 5, [2] * 9, [3] * 12], 6)
  before = decode.compilation_count()
  run([[4] * 16, [5] * 3], 8)
  run([[1], [2, 3], [4, 5, 6], [7] * 14], 5)
  assert decode.compilation_count() == before
  run([[1] * 20], 3)  # prompt bucket 24: one new prefill and one new decode program
  assert decode.compilation_count() == before + 2


def test_second_call_compiles_and_plans_nothing(models):
  """A generate call on shapes already seen builds nothing: no XLA compile of any kind (engine programs, the
  zero cache and slot state), no new plan; and it returns the same tokens."""
  _, model = models
  compiles = []
  listener = lambda name, secs, **kw: compiles.append(name) if name == COMPILE_EVENT else None
  two = decode.EngineConfig(slots=2)
  run = lambda: decode.generate(model, [[1] * 7, [2] * 3, [5] * 11], max_new_tokens=6, stop_ids=[96], engine=two)
  first = run()
  plans = decode.plans_made()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    second = run()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [] and decode.plans_made() == plans
  assert second.tokens == first.tokens
  decode.generate(model, [[1] * 7], max_new_tokens=40, stop_ids=[96], engine=two)  # a new shape plans anew
  assert decode.plans_made() == plans + 1


def test_sharded_matches_single_device(models):
  ref, model = models
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = hf_reference.rrjax_twin(ref, CONFIG, mesh=mesh)
  for kw in ({}, {"temperature": 1.0, "top_k": 20, "seed": 4}):
    single = decode.generate(model, PROMPTS, max_new_tokens=16, stop_ids=[7], **kw)
    multi = decode.generate(sharded, PROMPTS, max_new_tokens=16, stop_ids=[7], mesh=mesh, **kw)
    assert multi.tokens == single.tokens and multi.finish_reasons == single.finish_reasons
    for a, b in zip(multi.logprobs, single.logprobs):
      np.testing.assert_allclose(a, b, atol=TOL)
  # Batch over data x fsdp (4), kv heads over tensor (2): each device holds 1/8 of the keys/values.
  shape = dict(slots=8, length=96, prefill_rows=8, prompt_len=64, cache_dtype="float32")
  whole, split = engine_memory.estimate(model, **shape), engine_memory.estimate(sharded, mesh=mesh, **shape)
  kv = 2 * CONFIG.num_layers * 8 * 96 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
  # Besides keys/values, each slot keeps a few int32 words (length, next token, budgets, ...) and its stop ids,
  # replicated (the engine's slots need no per-position segment ids: right padding and lengths mask).
  slot_state = 8 * (engine_memory.SLOT_STATE_INTS + 8) * 4
  assert whole.kv_cache == kv + slot_state and split.kv_cache == kv // 8 + slot_state
  assert split.weights < whole.weights


def test_memory_check_reports_need_and_batch_size(models):
  _, model = models
  prompts = [[1, 2, 3]] * 16
  est = lambda b: engine_memory.estimate(model, slots=b, length=96, prefill_rows=b, prompt_len=64,
                                         cache_dtype="float32", steps=32)
  est16, est4 = est(16), est(4)
  limit = (est4.total + est16.total) // 2 if est4.total < est16.total // 2 else est4.total
  assert est4.total <= limit < est16.total
  run = lambda **kw: decode.generate(model, prompts, max_new_tokens=4, stop_ids=NO_STOP, **kw)
  with pytest.raises(decode.DecodeMemoryError, match=r"16 slots .* need .* GiB per device.*batch_size=(4|8)") as e:
    run(memory_limit_bytes=limit, engine=decode.EngineConfig(slots=16, prefill_group=16))
  assert isinstance(e.value, ValueError)
  with pytest.raises(decode.DecodeMemoryError, match="does not fit even at 1 slot"):
    run(memory_limit_bytes=1000)
  for out in (run(memory_limit_bytes=limit, engine=decode.EngineConfig(slots=4)), run(memory_limit_bytes=limit)):
    # Unset slots: the most that fit (with a smaller prefill group, 16 may).
    assert out.lengths == [4] * 16 and out.engine["slots"] >= 4 and out.engine["estimate_bytes"] <= limit


def test_input_validation(models):
  _, model = models
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    decode.generate(model, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
    decode.generate(model, [[97]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    decode.generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
  assert decode.generate(model, [[1]], max_new_tokens=0, stop_ids=NO_STOP).tokens == [[]]


def test_samples_of_one_prefill_equal_repeated_prompts(models):
  """num_samples=G: one prefill per prompt into G slots, the same streams as the prompt list repeated G times."""
  _, model = models
  kw = dict(max_new_tokens=10, stop_ids=[7], temperature=1.0, top_k=20, seed=9)
  eight = decode.EngineConfig(slots=8)
  shared = decode.generate(model, PROMPTS[:3], num_samples=4, engine=eight, **kw)
  repeated = decode.generate(model, [p for p in PROMPTS[:3] for _ in range(4)], engine=eight, **kw)
  assert shared.tokens == repeated.tokens and shared.finish_reasons == repeated.finish_reasons
  assert shared.engine["prefill_rows"] < repeated.engine["prefill_rows"] == 12
  assert len({tuple(t) for t in shared.tokens[:4]}) > 1  # the samples of one prompt differ
  per_prompt = decode.generate(model, PROMPTS[:2], max_new_tokens=[3, 9], stop_ids=NO_STOP)
  assert per_prompt.lengths == [3, 9]


def test_ahead_of_time_prefill_is_the_engines_largest(models, monkeypatch):
  """decode.programs (what preflight compiles for GRPO rollouts) prefills as many prompts at once as the engine
  ever does: with G copies per prompt, the prompts whose copies fill the slots, not one prompt per slot."""
  from rrjax.engine.programs import Programs

  _, model = models
  seen = []
  prefill = Programs.prefill

  def spy(self, params, rows, prompt, copies=1, chunk=None):
    seen.append((rows, copies))
    return prefill(self, params, rows, prompt, copies, chunk)

  monkeypatch.setattr(Programs, "prefill", spy)
  prompts = [list(range(3, 3 + n)) for n in (5, 9, 4, 12, 7, 6)]
  decode.generate(model, prompts, max_new_tokens=[2, 5, 3, 8, 4, 6], num_samples=4,
                  engine=decode.EngineConfig(slots=8), stop_ids=NO_STOP)
  built = {name: args for name, _, args in decode.programs(model, len(prompts), 12, max_new_tokens=8, num_samples=4,
                                                         engine=decode.EngineConfig(slots=8))}
  rows, P = built["rollout_prefill"][1].shape
  assert max(r for r, _ in seen) <= rows <= 4 and P >= 12  # 8 slots: at most 1 + ceil(7 / 4) prompts at a time
  assert {c for _, c in seen} == {built["rollout_prefill"][3].shape[1]} == {4}
  assert built["rollout_decode"][2].lengths_B.shape == (8,)
