"""Hugging Face import/export: transformers loads what we write, we load what it writes, errors are clear."""

import json
import subprocess
import sys

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
from rrjax import sharding
from rrjax.model import hf
from rrjax.model.qwen2 import Qwen2, Qwen2Config

CONFIG = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model():
  return Qwen2(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
  return rrjax.save_pretrained(model, tmp_path_factory.mktemp("hf") / "out")


def test_export_loads_in_transformers_with_same_logits(model, exported):
  names = {p.name for p in exported.iterdir()}
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= names
  ref = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9))
  np.testing.assert_allclose(hf_reference.torch_logits(ref, tokens), np.asarray(model(jnp.asarray(tokens))),
                             atol=1e-5, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(exported)
  assert tok.eos_token_id == 151645
  config = json.loads((exported / "config.json").read_text())
  generation = json.loads((exported / "generation_config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
  assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643


def test_export_with_a_small_tokenizer_takes_its_special_ids(tmp_path):
  from train_fixtures import small_tokenizer, tiny_config
  tok = small_tokenizer(tmp_path / "tok")
  small = Qwen2(tiny_config(vocab_size=-(-len(tok) // 64) * 64), rngs=nnx.Rngs(0))
  out = rrjax.save_pretrained(small, tmp_path / "hf", tokenizer=tok)
  config = json.loads((out / "config.json").read_text())
  generation = json.loads((out / "generation_config.json").read_text())
  end_of_text = tok.token_to_id("<|endoftext|>")
  assert (config["bos_token_id"], config["eos_token_id"]) == (end_of_text, tok.eos_token_id)
  assert generation["eos_token_id"] == [tok.eos_token_id, end_of_text] and generation["pad_token_id"] == end_of_text
  assert max(config["bos_token_id"], config["eos_token_id"]) < config["vocab_size"]
  assert rrjax.from_pretrained(out).config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("tied", [True, False])
def test_hf_dir_roundtrip_identical_tensors(tmp_path, tied):
  config = CONFIG.replace(tie_word_embeddings=tied, vocab_size=300)
  ref = hf_reference.torch_model(config)
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ours = rrjax.from_pretrained(tmp_path / "hf", dtype="float32")
  rrjax.save_pretrained(ours, tmp_path / "again", dtype="float32")
  original = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
  again = safetensors.numpy.load_file(tmp_path / "again" / "model.safetensors")
  if tied:
    original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(again)
  for name in original:
    np.testing.assert_array_equal(original[name], again[name], err_msg=name)


def test_sharded_export_and_sharded_import(model, tmp_path):
  out = hf.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=8_000_000, dtype="bfloat16")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) >= 2 and all((out / f).exists() for f in files)
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  loaded = rrjax.from_pretrained(out, dtype="float32", mesh=mesh)
  assert loaded.layers.up_kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  expected = np.asarray(model.layers.up_kernel[...]).astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded.layers.up_kernel[...]), expected)
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  tokens = np.arange(10)[None]
  np.testing.assert_allclose(hf_reference.torch_logits(ref, tokens), np.asarray(loaded(jnp.asarray(tokens))),
                             atol=1e-4, rtol=0)


def test_export_is_atomic(model, tmp_path, monkeypatch):
  target = tmp_path / "atomic"
  rrjax.save_pretrained(model, target)
  before = (target / "model.safetensors").read_bytes()

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", boom)
  with pytest.raises(RuntimeError):
    rrjax.save_pretrained(model, target)
  assert (target / "model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic"]  # no temporary left behind


# ---- bad input: one line naming the file and the tensor or field


def _write_hf(tmp_path, config=None):
  config = config or CONFIG.replace(vocab_size=300)
  path = tmp_path / "ckpt"
  rrjax.save_pretrained(Qwen2(config, rngs=nnx.Rngs(0)), path)
  return path


def test_missing_config_field(tmp_path):
  path = _write_hf(tmp_path)
  d = json.loads((path / "config.json").read_text())
  del d["num_key_value_heads"]
  (path / "config.json").write_text(json.dumps(d))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: missing field 'num_key_value_heads'"):
    rrjax.from_pretrained(path)


def test_wrong_architecture(tmp_path):
  path = _write_hf(tmp_path)
  d = json.loads((path / "config.json").read_text())
  d.update(architectures=["LlamaForCausalLM"], model_type="llama")
  (path / "config.json").write_text(json.dumps(d))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: architecture .*LlamaForCausalLM"):
    rrjax.from_pretrained(path)


def test_wrong_tensor_shape(tmp_path):
  path = _write_hf(tmp_path)
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 5), np.float32)
  safetensors.numpy.save_file(tensors, path / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj"
                                               r"\.weight' has shape \(5, 5\)"):
    rrjax.from_pretrained(path)


def test_missing_tensor_and_missing_shard(tmp_path):
  path = hf.save_pretrained(Qwen2(CONFIG.replace(vocab_size=300), rngs=nnx.Rngs(0)), tmp_path / "s",
                    max_shard_bytes=20_000)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[1]
  (path / victim).unlink()
  with pytest.raises(hf.CheckpointError, match=f"{victim}: shard named in the index is missing"):
    rrjax.from_pretrained(path)
  del index["weight_map"]["model.norm.weight"]
  (path / victim).write_bytes(b"")
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(hf.CheckpointError, match="tensor 'model.norm.weight' is missing"):
    rrjax.from_pretrained(path)


def test_pickle_only_checkpoint_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(hf.CheckpointError, match="safetensors only"):
    rrjax.from_pretrained(tmp_path)


def test_cli_bad_checkpoint_one_line_nonzero_exit(tmp_path):
  path = _write_hf(tmp_path)
  d = json.loads((path / "config.json").read_text())
  del d["hidden_size"]
  (path / "config.json").write_text(json.dumps(d))
  proc = subprocess.run([sys.executable, "-m", "rrjax.export", "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "config.json: missing field 'hidden_size'" in lines[0], proc.stderr
  assert not (tmp_path / "o").exists()
