"""Qwen3 (q/k norms, no attention bias, explicit head_dim) against transformers' Qwen3ForCausalLM (torch, float32):
logits after import and after an export round trip, greedy generation through the engine, the presets."""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import hf_reference
import rrjax
from rrjax import decode, tokenizer
from rrjax.model import hf, lora
from rrjax.model.lora import LoraConfig
from rrjax.model.qwen2 import QWEN3_SIZES, Qwen2, Qwen2Config

TOL = 1e-4
QWEN3 = dict(qk_norm=True, attention_bias=False)
# Two layouts where attention width N*H differs from hidden_size (as in Qwen3-0.6B, 4B, 32B): wider and tied,
# narrower and untied.
LAYOUTS = {
    "wide-tied": Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, tie_word_embeddings=True, **QWEN3),
    "narrow-untied": Qwen2Config(vocab_size=97, hidden_size=96, intermediate_size=64, num_layers=3, num_heads=4,
                                 num_kv_heads=1, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                 **QWEN3),
}
# sha256 of the official Hugging Face config.json files (pins in shared/data/qwen3/configs/PROVENANCE.md).
OFFICIAL_SHA256 = {
    "Qwen3-0.6B": "660db3b73d788119c04535e48cf9be5f55bc3100841a718637ae695b442f27dd",
    "Qwen3-1.7B": "1ddb5b89ebc90dcb417a45c213d818577e65976454d29385c8f6140771d95197",
    "Qwen3-4B": "8ba006f74fecfaaeb392872a60f4a480e7ec9860153d2e1b769ec81f9a147f8a",
    "Qwen3-8B": "f7c4eadfbbf522470667b797a3c89be2524832d2d599797248dc304fff447c30",
    "Qwen3-14B": "e73c3664ca09b10a673fef0c22e8a6b456201d49bd4713c9691f775720e8857a",
    "Qwen3-32B": "97e295b63283935788fac5e4f8860862a56d4089538cafc93f0431f2ebe483bb",
}
# Parameter counts computed from the configs (PROVENANCE.md), agreeing with Qwen's published 0.6B count.
PARAMS = {"0_6b": 596_049_920, "1_7b": 1_720_574_976, "4b": 4_022_468_096, "8b": 8_190_735_360,
          "14b": 14_768_307_200, "32b": 32_762_123_264}
ASSETS = Path(rrjax.__file__).parent / "assets"


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request):
  config = LAYOUTS[request.param]
  ref = hf_reference.varied_model(config, seed=len(request.param))
  if config.tie_word_embeddings:  # else each token's own embedding dominates its logits: greedy repeats the input
    with torch.no_grad():
      ref.model.embed_tokens.weight.mul_(0.1)
  return config, ref, hf_reference.rrjax_twin(ref, config)


def test_logits_match_transformers(pair):
  config, ref, ours = pair
  assert isinstance(ref, transformers.Qwen3ForCausalLM)
  assert {n for n, _ in ref.named_parameters() if "q_norm" in n or "k_norm" in n}  # the norms are in play
  for length in (1, 9):
    tokens = np.random.default_rng(length).integers(0, config.vocab_size, (2, length))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), hf_reference.torch_logits(ref, tokens),
                               atol=TOL, rtol=0)


def test_import_and_export_round_trip(pair, tmp_path):
  config, ref, _ = pair
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ours = rrjax.from_pretrained(tmp_path / "hf", dtype="float32")
  assert (ours.config.qk_norm, ours.config.attention_bias, ours.config.head_dim) == (True, False, 16)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
  expected = hf_reference.torch_logits(ref, tokens)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), expected, atol=TOL, rtol=0)

  out = rrjax.save_pretrained(ours, tmp_path / "again", dtype="float32")
  written = json.loads((out / "config.json").read_text())
  assert (written["model_type"], written["architectures"], written["attention_bias"]) == (
      "qwen3", ["Qwen3ForCausalLM"], False)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert type(back) is transformers.Qwen3ForCausalLM
  assert tokenizer.load(out).think_ids == (151667, 151668)  # the bundled Qwen3 tokenizer goes with it
  np.testing.assert_allclose(hf_reference.torch_logits(back, tokens), expected, atol=TOL, rtol=0)
  original = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
  again = safetensors.numpy.load_file(out / "model.safetensors")
  if config.tie_word_embeddings:
    original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(again)
  assert not any(name.endswith("bias") for name in again)
  for name in original:
    np.testing.assert_array_equal(original[name], again[name], err_msg=name)


def test_greedy_generation_matches_transformers(pair):
  config, ref, ours = pair
  prompts = [[5, 17, 3, 88, 41], [7, 2, 9], [33]]
  out = decode.generate(ours, prompts, max_new_tokens=24, stop_ids=())
  for prompt, tokens in zip(prompts, out.tokens):
    with torch.no_grad():
      hf_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(prompt):].tolist()
    assert tokens == hf_tokens
  assert len({t for tokens in out.tokens for t in tokens}) > 5  # not a degenerate repeat


@pytest.mark.parametrize("size", sorted(PARAMS))
def test_presets_are_the_official_configs(size):
  name = QWEN3_SIZES[size]
  raw = (ASSETS / "qwen3-configs" / name / "config.json").read_bytes()
  assert hashlib.sha256(raw).hexdigest() == OFFICIAL_SHA256[name]
  config = getattr(Qwen2Config, f"qwen3_{size}")()
  assert config == Qwen2Config.preset(f"qwen3_{size}") == Qwen2Config.preset(name)
  assert config.param_count() == PARAMS[size]
  official = json.loads(raw)
  assert (config.model_type, config.head_dim, config.tie_word_embeddings, config.max_position_embeddings) == (
      "qwen3", 128, official["tie_word_embeddings"], 40960)
  # What rrjax writes for it reads back to the same architecture, and transformers reads the same shapes.
  assert Qwen2Config.from_hf_dict(config.to_hf_dict(), name=name) == config
  theirs = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
  assert (theirs.head_dim, theirs.num_key_value_heads, theirs.attention_bias) == (128, 8, False)


def test_qwen3_config_json_errors():
  official = json.loads((ASSETS / "qwen3-configs" / "Qwen3-0.6B" / "config.json").read_text())
  with pytest.raises(ValueError, match=r"^x\.json: attention_bias: true is not supported for Qwen3"):
    Qwen2Config.from_hf_dict({**official, "attention_bias": True}, source="x.json")
  with pytest.raises(ValueError, match=r"^x\.json: architecture \['Qwen2ForCausalLM'\] / model_type 'qwen3'"):
    Qwen2Config.from_hf_dict({**official, "architectures": ["Qwen2ForCausalLM"]}, source="x.json")
  # transformers' Qwen3 default head_dim is 128, whatever hidden_size / num_attention_heads is.
  assert Qwen2Config.from_hf_dict({k: v for k, v in official.items() if k != "head_dim"}).head_dim == 128
  # Qwen3's sliding_window default (4096) applies when the file turns the window on without a size.
  with pytest.raises(ValueError, match="sliding_window=4096"):
    Qwen2Config.from_hf_dict({**official, "use_sliding_window": True, "sliding_window": None,
                              "max_window_layers": 0})
  with pytest.raises(ValueError, match="neither Qwen2"):
    LAYOUTS["wide-tied"].replace(attention_bias=True)


def test_model_has_qwen3_weights_only():
  model = nnx.eval_shape(lambda: Qwen2(LAYOUTS["wide-tied"], rngs=nnx.Rngs(0)))
  weights = {name: v for name, v in vars(model.layers).items() if isinstance(v, nnx.Param)}
  assert weights["q_norm"].shape == weights["k_norm"].shape == (2, 16)
  assert not {"q_bias", "k_bias", "v_bias"} & set(weights)
  assert "model.layers.0.self_attn.q_norm.weight" in hf._expected_names(model.config)


def test_lora_on_every_target_merges_into_what_transformers_runs(tmp_path):
  """Adapters on q/k/v/o/gate/up/down: the q/k deltas enter before the q/k norms, so the adapted forward
  equals the merged kernels' forward, and the merged model exports to the same Qwen3ForCausalLM logits."""
  config = LAYOUTS["narrow-untied"]
  base = Qwen2(config, rngs=nnx.Rngs(0))
  adapted = lora.apply_lora(base, LoraConfig(rank=2, alpha=4.0), seed=1)
  state = nnx.state(adapted, nnx.LoRAParam)
  assert len(nnx.to_flat_state(state)) == 2 * 7
  for i, (_, v) in enumerate(nnx.to_flat_state(state)):
    v[...] = jax.random.normal(jax.random.key(i), v.shape) * 0.1
  nnx.update(adapted, state)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 8))
  got = np.asarray(adapted(jnp.asarray(tokens)))
  assert np.abs(got - np.asarray(base(jnp.asarray(tokens)))).max() > 1e-2  # the adapters change the output
  merged = lora.merge_lora(adapted)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(tokens))), got, atol=TOL, rtol=0)
  back = transformers.AutoModelForCausalLM.from_pretrained(rrjax.save_pretrained(merged, tmp_path / "m"),
                                                          dtype=torch.float32)
  np.testing.assert_allclose(hf_reference.torch_logits(back, tokens), got, atol=TOL, rtol=0)


def test_sampling_with_min_p_is_reproducible_across_slot_counts():
  """ReasonRank-8B's decoding (T 0.6, top-k 20, top-p 0.95; min_p raised from upstream's 0 so that it bites)
  through the engine: a prompt's tokens depend on the seed only, not on how many slots run beside it."""
  config = LAYOUTS["narrow-untied"]
  model = hf_reference.rrjax_twin(hf_reference.varied_model(config, seed=3), config)
  prompts = [[5, 17, 3, 88, 41], [7, 2, 9], [33], [60, 61]]
  kw = dict(max_new_tokens=12, stop_ids=(), temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, seed=11)
  runs = [decode.generate(model, prompts, engine=decode.EngineConfig(slots=b), **kw).tokens for b in (1, 3, 4)]
  assert runs[0] == runs[1] == runs[2]
  assert runs[0] != decode.generate(model, prompts, **{**kw, "seed": 12}).tokens
  assert runs[0] != decode.generate(model, prompts, max_new_tokens=12, stop_ids=()).tokens  # sampled, not greedy


@pytest.mark.slow
def test_8b_rerank_config_compiles_for_its_tpu_slice_at_reduced_layers(tmp_path):
  """configs/rerank/reasonrank_8b_v5e.gin on v5e:2x2 (one replica of tensor 4) with Qwen3-8B's widths and 4 of
  its 36 layers, through the real TPU compiler: the qwen3 prompt measured with the Qwen3 tokenizer, the sampling
  engine's programs fit. (Full size: 8 slots x 20,480, peak 13.9 of 16 GiB per chip; launch/SCALING.md.)"""
  from test_preflight import _preflight
  from rrjax.ranking import prompt as prompt_lib
  from rrjax.rerank import cli as rerank_cli
  from rrjax.rerank import preflight as rerank_preflight

  config = json.loads((ASSETS / "qwen3-configs" / "Qwen3-8B" / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4, "max_window_layers": 4}))
  proc, rep = _preflight("--model", str(tmp_path), "--gin_file", "rerank/reasonrank_8b_v5e.gin",
                         "--topology", "v5e:2x2", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert rep["platform"] == "tpu" and rep["fits"] and rep["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
  settings = rerank_cli.settings_from_gin(["rerank/reasonrank_8b.gin"])
  assert (settings.prompt_mode, settings.temperature, settings.top_p, settings.sampling_top_k, settings.min_p) == (
      "qwen3", 0.6, 0.95, 20, 0.0)
  qwen3 = tokenizer.load(model_type="qwen3")
  r = rep["rerank"]
  assert r["mode"] == "listwise" and r["prompt_tokens"] == rerank_preflight.longest_prompt(settings, qwen3) > 20 * 512
  assert r["prompt_tokens"] != rerank_preflight.longest_prompt(
      dataclasses.replace(settings, prompt_mode="reasoning"), qwen3)  # the 8B prompt, not the 7B one
  assert prompt_lib.prompt_mode("rank_GPT_qwen3") == settings.prompt_mode


def test_rerank_settings_take_upstream_mode_names_and_sampling_flags():
  from rrjax.rerank import cli as rerank_cli
  from rrjax.rerank.settings import RerankSettings

  args = rerank_cli.build_parser().parse_args(["--model", "m", "--corpus", "c", "--out", "o.trec", "--prompt-mode",
                                               "rank_GPT_qwen3", "--sampling-top-k", "20", "--min-p", "0.05"])
  s = rerank_cli.resolve_settings(args)
  assert (s.prompt_mode, s.sampling_top_k, s.min_p, s.top_k) == ("qwen3", 20, 0.05, 100)
  assert RerankSettings(prompt_mode="rank_GPT").prompt_mode == "plain"
  with pytest.raises(ValueError, match="prompt_mode: .*'rank_GPT_rankk'"):
    RerankSettings(prompt_mode="rank_GPT_rankk")
  with pytest.raises(ValueError, match="min_p"):
    RerankSettings(min_p=1.5)


def test_gradients_reach_the_qk_norms_as_in_torch(pair):
  """What SFT and GRPO differentiate: the next-token loss's gradients, the q/k norm weights' included, equal
  torch's (float32) through the scanned, rematerialised layers."""
  config, ref, _ = pair
  config = config.replace(remat="full")
  ours = hf_reference.rrjax_twin(ref, config)
  tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, 10))

  def loss(model):
    logp = jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1])), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], axis=-1).mean()

  grads = nnx.grad(loss)(ours)
  ref.zero_grad()
  logits = ref(torch.tensor(tokens[:, :-1])).logits
  torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), torch.tensor(tokens[:, 1:]).reshape(-1)
                                    ).backward()
  for i in range(config.num_layers):
    attn = ref.model.layers[i].self_attn
    for ours_name, theirs in (("q_norm", attn.q_norm.weight), ("k_norm", attn.k_norm.weight)):
      want = theirs.grad.numpy()
      assert np.abs(want).max() > 1e-4
      np.testing.assert_allclose(np.asarray(getattr(grads.layers, ours_name)[...][i]), want, atol=1e-5, rtol=1e-3)
