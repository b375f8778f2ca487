"""Hugging Face checkpoints as they exist in the wild, built with the installed transformers (5.x layouts) or
written by hand (4.x layouts: 4.x cannot be installed next to it): each imports with transformers' logits,
exports to a directory transformers loads with ours, and keeps its token ids (null stays null)."""

import copy
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_reference
import rrjax
from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2Config

# transformers.Qwen2Config arguments; token ids, head_dim and rope are left to each layout.
BASE = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TOKENS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 11))
DROP = object()


def _random_hf(seed: int = 0, **kw) -> transformers.Qwen2ForCausalLM:
  """A random transformers model; biases and norm weights are randomised too so that every tensor matters."""
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**BASE, **kw}))
  return hf_reference.randomize(model.float().eval())


def _edit_config(path: Path, **fields) -> Path:
  """Sets (or with DROP removes) config.json fields."""
  d = json.loads((path / "config.json").read_text())
  for key, value in fields.items():
    if value is DROP:
      d.pop(key, None)
    else:
      d[key] = value
  (path / "config.json").write_text(json.dumps(d, indent=2))
  return path


def _edit_tensors(path: Path, file: str = "model.safetensors", **tensors) -> Path:
  stored = safetensors.numpy.load_file(path / file)
  stored.update(tensors)
  safetensors.numpy.save_file(stored, path / file, metadata={"format": "pt"})
  return path


def _v5(path: Path, torch_dtype=torch.float32, save_kw=None, **kw) -> Path:
  _random_hf(**kw).to(torch_dtype).save_pretrained(path, **(save_kw or {}))
  return path


# Qwen2.5-Instruct's config.json as transformers 4.43-4.49 wrote it (rope_theta at the top level, rope_scaling
# null, torch_dtype, no head_dim or layer_types), with the eos list of its generation config.
_V4_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 3, "eos_token_id": [5, 7],
    "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 300,
}


def _v4(path: Path, **fields) -> Path:
  _v5(path)  # the weights; rope has none, so only the config.json written below decides it
  (path / "config.json").write_text(json.dumps(_V4_CONFIG))
  return _edit_config(path, **fields)


def _inv_freq(path: Path) -> Path:
  buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in range(2)}
  return _edit_tensors(path, **buffers)


def _tied_with_head(path: Path) -> Path:
  _v5(path, tie_word_embeddings=True)
  embed = safetensors.numpy.load_file(path / "model.safetensors")["model.embed_tokens.weight"]
  return _edit_tensors(path, **{"lm_head.weight": embed.copy()})


LAYOUTS = {
    "v5-null-ids": lambda p: _v5(p),
    "v5-ids-eos-list-head-dim-tied": lambda p: _v5(p, bos_token_id=3, eos_token_id=[5, 7], head_dim=16,
                                                   rope_theta=1e6, tie_word_embeddings=True),
    "v5-sliding-window-on-no-layer": lambda p: _v5(p, use_sliding_window=True, sliding_window=16,
                                                   max_window_layers=2, eos_token_id=9),
    "v5-sliding-window-not-shorter": lambda p: _v5(p, use_sliding_window=True, sliding_window=32768,
                                                   max_window_layers=0),
    "v4": lambda p: _v4(p),
    "v4-eos-int-head-dim-rope-scaling-default": lambda p: _v4(p, eos_token_id=5, head_dim=8,
                                                              rope_scaling={"type": "default"}),
    "v4-ids-and-rope-theta-missing": lambda p: _v4(p, bos_token_id=DROP, eos_token_id=DROP, rope_theta=DROP),
    "v4-null-ids": lambda p: _v4(p, bos_token_id=None, eos_token_id=None),
    "weights-bfloat16": lambda p: _v5(p, torch.bfloat16),
    "weights-float16": lambda p: _v5(p, torch.float16),
    "weights-sharded": lambda p: _v5(p, save_kw={"max_shard_size": "20KB"}),
    "weights-tied-with-lm-head": _tied_with_head,
    "weights-extra-buffers": lambda p: _inv_freq(_v5(p)),
}


def _first(token_id):
  return token_id[0] if isinstance(token_id, list) else token_id


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_imports_and_exports_like_transformers(layout, tmp_path, caplog):
  src = LAYOUTS[layout](tmp_path / "src")
  if layout == "weights-sharded":
    assert (src / "model.safetensors.index.json").exists()
  theirs = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  with caplog.at_level(logging.WARNING, logger="rrjax.hf"):
    ours = rrjax.from_pretrained(src, dtype="float32")
  warnings = [r.getMessage() for r in caplog.records if r.name == "rrjax.hf"]
  if layout == "weights-extra-buffers":
    assert len(warnings) == 1 and "model.layers.*.self_attn.rotary_emb.inv_freq (x2)" in warnings[0], warnings
  else:
    assert warnings == []
  logits = np.asarray(ours(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(logits, hf_reference.torch_logits(theirs, TOKENS), atol=1e-4, rtol=0)

  out = rrjax.save_pretrained(ours, tmp_path / "out")
  again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  np.testing.assert_allclose(hf_reference.torch_logits(again, TOKENS), logits, atol=1e-5, rtol=0)

  before, after = (transformers.AutoConfig.from_pretrained(p) for p in (src, out))
  assert after.bos_token_id == before.bos_token_id
  assert _first(after.eos_token_id) == _first(before.eos_token_id)  # rrjax keeps an eos list's first id
  generation = json.loads((out / "generation_config.json").read_text())
  if before.eos_token_id is None:
    assert generation["eos_token_id"] is None and generation["pad_token_id"] is None
  written = json.loads((out / "config.json").read_text())
  ids = [written["bos_token_id"], written["eos_token_id"], *np.atleast_1d(generation["eos_token_id"] or []),
         generation["pad_token_id"]]
  assert all(i < written["vocab_size"] for i in ids if i is not None)


def test_null_ids_stay_null_in_the_config_and_through_an_export(tmp_path):
  src = _v5(tmp_path / "src")
  assert json.loads((src / "config.json").read_text())["bos_token_id"] is None  # what transformers writes
  config = rrjax.from_pretrained(src).config
  assert (config.bos_token_id, config.eos_token_id) == (None, None)
  out = rrjax.save_pretrained(rrjax.from_pretrained(src), tmp_path / "out")
  written = json.loads((out / "config.json").read_text())
  assert (written["bos_token_id"], written["eos_token_id"]) == (None, None)
  assert Qwen2Config.from_hf_dict(written).eos_token_id is None
  # A full-vocabulary model without ids is not given Qwen2.5's 151643/151645 either.
  wide = rrjax.from_pretrained(_v5(tmp_path / "wide", vocab_size=151936))
  written = json.loads((rrjax.save_pretrained(wide, tmp_path / "wide_out") / "config.json").read_text())
  assert (written["bos_token_id"], written["eos_token_id"]) == (None, None)


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_half_precision_weights_load_into_the_requested_dtype(tmp_path, torch_dtype, dtype):
  src = _v5(tmp_path / "src", torch_dtype)
  model = rrjax.from_pretrained(src, dtype=dtype)
  stored = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype).model.norm.weight
  expected = stored.detach().float().numpy().astype(jnp.dtype(dtype))
  assert model.final_norm[...].dtype == jnp.dtype(dtype) and model.config.param_dtype == dtype
  np.testing.assert_array_equal(np.asarray(model.final_norm[...]), expected)


# ---- refused: configurations whose attention or rope rrjax would compute differently


@pytest.mark.parametrize("build,message", [
    (lambda p: _v5(p, use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "use_sliding_window: true with sliding_window=8 < max_position_embeddings=32768 restricts 1 of 2 layers"),
    (lambda p: _v4(p, use_sliding_window=True, sliding_window=4096, max_window_layers=0),
     "use_sliding_window: true with sliding_window=4096"),
    (lambda p: _edit_config(_v5(p), rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "rope_parameters: rope type 'yarn' is not supported"),
    (lambda p: _v4(p, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling: rope type 'linear'"),
    (lambda p: _v4(p, hidden_act="gelu"), "hidden_act: 'gelu' is not supported"),
], ids=["sliding-v5", "sliding-v4", "yarn", "linear", "gelu"])
def test_unsupported_configurations_refused_in_one_line(tmp_path, build, message):
  src = build(tmp_path / "src")
  with pytest.raises(hf.CheckpointError) as e:
    rrjax.from_pretrained(src)
  assert str(e.value).startswith(f"{src / 'config.json'}: ") and message in str(e.value)
  assert "\n" not in str(e.value)


# ---- broken input: one line naming the file and the field or tensor


@pytest.mark.parametrize("fields,message", [
    ({"num_key_value_heads": DROP}, "missing field 'num_key_value_heads'"),
    ({"hidden_size": DROP}, "missing field 'hidden_size'"),
    ({"hidden_size": None}, "hidden_size: is null"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers: expected a positive integer, got '2'"),
    ({"eos_token_id": "</s>"}, "eos_token_id: expected a token id, a list of them or null, got '</s>'"),
    ({"rope_theta": "big"}, "rope_theta: expected a number, got 'big'"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings: expected true or false"),
    ({"num_attention_heads": 3}, "num_heads=3 is not a multiple of num_kv_heads=2"),
])
def test_broken_config_is_one_line_naming_file_and_field(tmp_path, fields, message):
  src = _v4(tmp_path / "src", **fields)
  with pytest.raises(hf.CheckpointError) as e:
    rrjax.from_pretrained(src)
  assert str(e.value).startswith(f"{src / 'config.json'}: ") and message in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def _mismatched_head(path: Path) -> Path:
  _tied_with_head(path)
  embed = safetensors.numpy.load_file(path / "model.safetensors")["model.embed_tokens.weight"]
  return _edit_tensors(path, **{"lm_head.weight": embed + 0.01})


def _truncated(path: Path) -> Path:
  data = (_v5(path) / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[:-64])
  return path


@pytest.mark.parametrize("build,message", [
    (_mismatched_head, "model.safetensors: tensor 'lm_head.weight' differs from model.embed_tokens.weight"),
    (lambda p: _edit_tensors(_v5(p), **{"model.norm.weight": np.ones(32, np.int32)}),
     "model.safetensors: tensor 'model.norm.weight' has dtype I32"),
    (_truncated, "(truncated or corrupt)"),
    (lambda p: (_v5(p) / "model.safetensors").write_bytes(b"not safetensors") and p,
     "model.safetensors: not a safetensors file"),
], ids=["lm-head-differs", "integer-weights", "truncated", "not-safetensors"])
def test_broken_weights_are_one_line_naming_file_and_tensor(tmp_path, build, message):
  src = build(tmp_path / "src")
  with pytest.raises(hf.CheckpointError) as e:
    rrjax.from_pretrained(src)
  assert str(e.value).startswith(str(src)) and message in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_cli_bad_tensor_one_line_nonzero_exit(tmp_path):
  src = _mismatched_head(tmp_path / "src")
  proc = subprocess.run([sys.executable, "-m", "rrjax.export", "--checkpoint", str(src), "--out", str(tmp_path / "o")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "model.safetensors: tensor 'lm_head.weight' differs" in lines[0], proc.stderr
  assert not (tmp_path / "o").exists()


# ---- precision and CI


@pytest.mark.slow
def test_bf16_logits_no_further_from_float32_than_transformers_bf16():
  """Qwen2.5-0.5B widths and vocabulary (4 of its 24 layers), random weights rounded to bf16 so that every
  model holds the same values; the reference is transformers in float32 on those weights."""
  config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=4, num_heads=14,
                       num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
  ref = hf_reference.torch_model(config)
  ref.config._attn_implementation = "sdpa"  # what from_pretrained picks
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 64))
  expected = hf_reference.torch_logits(ref, tokens)
  ours = hf_reference.rrjax_twin(ref, config.replace(param_dtype="bfloat16", dtype="bfloat16"))
  assert ours.embed[...].dtype == jnp.bfloat16
  got = np.asarray(ours(jnp.asarray(tokens)))
  theirs = hf_reference.torch_logits(copy.deepcopy(ref).to(torch.bfloat16), tokens)
  err_ours, err_theirs = (float(np.abs(x - expected).max()) for x in (got, theirs))
  agree_ours, agree_theirs = ((x.argmax(-1) == expected.argmax(-1)).mean() for x in (got, theirs))
  print(f"bf16 max |err| rrjax {err_ours:.5f} transformers {err_theirs:.5f}; "
        f"argmax agreement rrjax {agree_ours:.4f} transformers {agree_theirs:.4f}")
  assert err_ours <= 1.1 * err_theirs

  def near_best(x):
    """Positions whose bf16 argmax is, in float32, within 2x bf16's own error of the best logit: a flip
    between tokens that close is rounding (which model flips is chance), any other is an error."""
    chosen = np.take_along_axis(expected, x.argmax(-1)[..., None], axis=-1)[..., 0]
    return (chosen >= expected.max(-1) - 2 * err_theirs).mean()

  assert near_best(got) == near_best(theirs) == 1.0


def test_test_extra_keeps_only_a_lower_bound_on_transformers():
  # CI installs the newest transformers that pip resolves; an upper bound or a pin would hide new layouts.
  pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
  (spec,) = [r for r in pyproject["project"]["optional-dependencies"]["test"] if r.startswith("transformers")]
  assert spec.startswith("transformers>=") and not any(op in spec for op in ("<", "==", "~=", ",", "!="))
