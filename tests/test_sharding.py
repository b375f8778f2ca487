"""Meshes, logical-axis rules, and the sharded forward on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rrjax import sharding
from rrjax.model.qwen2 import Qwen2, Qwen2Config

CONFIG = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


def test_eight_devices():
  assert jax.device_count() == 8


def test_mesh_shapes():
  assert sharding.MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
  assert sharding.MeshConfig().shape(8) == (8, 1, 1)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  for bad in (sharding.MeshConfig(data=-1, fsdp=-1), sharding.MeshConfig(data=3), sharding.MeshConfig(data=0)):
    with pytest.raises(ValueError, match="mesh"):
      sharding.make_mesh(bad)


def test_logical_spec_drops_axes_that_do_not_divide():
  sizes = {"data": 2, "fsdp": 2, "tensor": 4}
  assert sharding.logical_spec(("embed", "q_heads", "head_dim"), (32, 8, 8), sizes) == P("fsdp", "tensor", None)
  # 2 kv heads cannot be split 4 ways: replicate that dim rather than fail.
  assert sharding.logical_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), sizes) == P("fsdp", None, None)
  assert sharding.logical_spec(("batch", "length"), (4, 7), sizes) == P(("data", "fsdp"), None)
  assert sharding.logical_spec(("batch", "length"), (2, 7), sizes) == P("data", None)
  with sharding.axis_rules((("embed", "tensor"),)):
    assert sharding.logical_spec(("embed", "mlp"), (32, 64), sizes) == P("tensor", None)


def test_sharded_forward_equals_single_device():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  single = Qwen2(CONFIG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 11), 0, CONFIG.vocab_size)
  expected = np.asarray(single(tokens))

  model = sharding.create_sharded(lambda: Qwen2(CONFIG, rngs=nnx.Rngs(0)), mesh)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  checked = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    want = sharding.logical_spec(sharding.variable_logical_axes(v), v.shape, sizes)
    got = v[...].sharding
    assert got.mesh.shape == mesh.shape and got.spec == want, (path, got.spec, want)
    checked += 1
  assert checked == 15
  assert model.layers.q_kernel[...].sharding.spec == P(None, "fsdp", "tensor", None)
  assert model.embed[...].sharding.spec == P("tensor", "fsdp")
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # same values as the unsharded init
    ref = nnx.to_flat_state(nnx.state(single, nnx.Param))
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(dict(ref)[path][...]))

  @jax.jit
  def forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  with jax.set_mesh(mesh):
    tokens_sharded = jax.device_put(tokens, jax.NamedSharding(mesh, P(("data", "fsdp"))))
    got = forward(*nnx.split(model), tokens_sharded)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_shard_model_moves_existing_params():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  model = sharding.shard_model(Qwen2(CONFIG, rngs=nnx.Rngs(0)), mesh)
  assert model.layers.gate_kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
