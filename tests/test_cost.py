"""rrjax.cost / rrjax.hlo_count: work counted from compiled HLO (loops x trip counts, kernels by the analytic
attention formula) against XLA's own count and the architecture's, on CPU devices and the real TPU compiler
(compile only: nothing runs)."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from test_preflight import _gin, _preflight
from rrjax import cost, hardware, hlo_count, preflight, sharding
from rrjax.model import attention as attention_lib
from rrjax.model.qwen2 import Qwen2, Qwen2Config

TINY_SFT, TINY_GRPO = "configs/sft/tiny_cpu.gin", "configs/grpo/tiny_cpu.gin"


def _mesh(devices):
  return sharding.make_mesh(sharding.MeshConfig(data=len(devices)), devices=devices)


def _compiled(fn, args, mesh):
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*args).compile()


def _layers(L: int, B: int = 256, D: int = 512, scan: bool = True):
  """L identical [B, D] x [D, D] layers (tanh between, so XLA cannot fold them), scanned or unrolled."""

  def stack(x, w_LxDxD):
    if scan:
      return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, w_LxDxD)[0]
    for i in range(L):
      x = jnp.tanh(x @ w_LxDxD[i])
    return x

  return stack, (jax.ShapeDtypeStruct((B, D), jnp.float32), jax.ShapeDtypeStruct((L, D, D), jnp.float32))


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_scan_of_identical_layers_counts_L_times_one_layer(target):
  """XLA's cost_analysis counts a loop body once; the count multiplies it by the trip count (XLA:CPU's
  known_trip_count; on TPU read off the loop condition): L x one layer, equal to the analytic matmul FLOPs and
  to XLA's own count of the same layers unrolled; the weights are read one layer slice per iteration."""
  devices = preflight.tpu_devices("v5e:1x1") if target == "tpu" else jax.devices("cpu")[:1]
  mesh, B, D = _mesh(devices), 256, 512
  counts = {}
  for L in (1, 6):
    fn, args = _layers(L)
    compiled = _compiled(fn, args, mesh)
    counts[L] = hlo_count.count_hlo(compiled.as_text())
    assert counts[L].open_loops == 0
  assert counts[6].flops == 6 * counts[1].flops == 6 * 2 * B * D * D
  assert counts[6].loops == 1
  weights = 6 * D * D * 4
  # XLA:CPU copies each slice out before the matmul reads it: about 3 x the weights, where counting the whole
  # stacked operand per iteration would give over 6 x.
  assert weights <= counts[6].hbm_bytes < 6 * weights, (counts[6].hbm_bytes, weights)
  unrolled = _compiled(*_layers(6, scan=False), mesh)
  xla = unrolled.cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  # XLA's flops add the elementwise tanh (one per element per layer) to the matmuls.
  assert counts[6].flops == pytest.approx(xla["flops"] - 6 * B * D, rel=1e-3)
  scanned = _compiled(*_layers(6), mesh).cost_analysis()
  scanned = scanned[0] if isinstance(scanned, list) else scanned
  assert scanned["flops"] < counts[6].flops / 3  # what the issue measured: the body counted once


def _forward_cost(target: str, devices, config: Qwen2Config, rows: int, seq: int) -> tuple[float, float]:
  """(counted FLOPs, useful FLOPs) per device of a Qwen2 forward over [rows, seq] on `devices`."""
  mesh = _mesh(devices)
  stand_in = attention_lib.gpu_kernel_stand_in() if target == "gpu" else contextlib.nullcontext()
  with hardware.target_platform(target), stand_in, jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    spec = NamedSharding(mesh, PartitionSpec("data"))
    tokens = jax.ShapeDtypeStruct((rows, seq), np.int32, sharding=spec)

    def forward(state, tokens_BxT):
      return nnx.merge(graphdef, state)(tokens_BxT)

    text = jax.jit(forward).lower(state, tokens).compile().as_text()
  counted = hlo_count.count_hlo(text)
  want = cost.useful(cost.Work(config, "forward", rows, seq))
  return counted, want["flops"] / len(devices)


def test_collective_matmul_loop_counts_its_matmul_once():
  """An fsdp-sharded weight matmul on TPU becomes a windowed einsum: a loop taking two steps of a collective
  matmul per iteration, its counter stepping by 2. Read as steps of 1 it counted the matmul twice (the 32B
  LoRA GRPO recipe's rollout prefill and log-prob pass at 1.80x useful)."""
  devices = preflight.tpu_devices("v5p:2x2x2")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(8), ("fsdp",))
  B, T, D, F = 8, 4096, 5120, 27648
  sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
  x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=sharded)
  w = jax.ShapeDtypeStruct((D, F), jnp.bfloat16, sharding=sharded)
  fn = jax.jit(lambda x, w: jnp.einsum("btd,df->btf", x, w), out_shardings=sharded)
  text = fn.lower(x, w).compile().as_text()
  assert "windowed_dot_general" in text  # the case this is about
  counted = hlo_count.count_hlo(text)
  assert counted.loops >= 1 and counted.open_loops == 0
  assert counted.flops == 2 * T * D * F  # one row of B per device, the whole weight


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_tiny_qwen2_forward_within_5_percent_of_analytic(target):
  """A 2-layer Qwen2 (a 512-token vocabulary, so attention weighs: 1,024 tokens) per device: on cpu:2 with GPU
  settings (cuDNN built as its chunked stand-in, counted over the causal pairs) and on v5e:2x2 (splash, counted
  by its formula), the compiled matmul FLOPs are within 5% of 2 x parameters x tokens + causal attention."""
  config = Qwen2Config.tiny(head_dim=128, vocab_size=512, dtype="bfloat16", param_dtype="bfloat16", attention="auto")
  devices = preflight.tpu_devices("v5e:2x2") if target == "tpu" else jax.devices("cpu")[:2]
  counted, useful = _forward_cost(target, devices, config, rows=2 * len(devices), seq=1024)
  kernel = "splash_fwd" if target == "tpu" else "cudnn stand-in (causal pairs)"
  assert kernel in counted.kernels, counted.kernels
  assert counted.flops == pytest.approx(useful, rel=0.05), (counted.flops, useful)


def _report(gin, params, **kw):
  return preflight.run([gin], ["model_preset.vocab_size = 512", *params], "cpu:1", platform="cpu", cost=True,
                       chip="v5p", devices=jax.devices("cpu")[:1], **kw)[0]


@pytest.mark.slow
def test_tiny_recipes_compile_at_least_the_useful_work():
  """Every program of the tiny SFT and GRPO recipes (one CPU) does at least the useful FLOPs, and a decode step
  reads at least the weights and the live cache; the step's roofline adds up from the programs' calls."""
  for gin in (TINY_SFT, TINY_GRPO):
    rep = _report(gin, [])
    assert rep["chip"]["kind"] == "v5p"
    for p in rep["programs"]:
      c = p["cost"]
      assert c["flops"] >= c["useful_flops"] * 0.999, (gin, p["name"], c)
      assert c["hbm_bytes"] >= c["useful_hbm_bytes"], (gin, p["name"], c)
      if c["useful_flops"]:
        assert c["flops_ratio"] == pytest.approx(c["flops"] / c["useful_flops"])
    step = sum(p["cost"]["roofline_seconds"] * p["cost"]["calls"] for p in rep["programs"])
    assert rep["step_seconds"] == pytest.approx(step) and 0 < rep["mfu_ceiling"] <= 1
    assert rep["run_hours"] == pytest.approx(rep["run_steps"] * step / 3600)


@pytest.mark.slow
def test_remat_full_moves_the_ratio_by_its_recompute():
  """remat 'full' against 'none' on the same SFT step (v5e:2x2, splash counted by its formula; 512 tokens, 2
  layers, a 512-token vocabulary): the compiled FLOPs grow by exactly the recompute the policy implies, every
  layer's forward again but its last matmul (the down projection, whose output no gradient needs)."""
  costs = {}
  for remat in ("none", "full"):
    rep, _ = preflight.run([TINY_SFT], ["model_preset.vocab_size = 512", f"model_preset.remat = '{remat}'",
                                        "SFTDataConfig.seq_len = 512"], "v5e:2x2", cost=True)
    assert rep["chip"]["kind"] == "v5e"
    (costs[remat],) = [p["cost"] for p in rep["programs"]]
  none, full = costs["none"], costs["full"]
  assert none["remat_flops"] == 0 and full["remat_flops"] > 0.2 * full["useful_flops"]
  assert full["useful_flops"] == none["useful_flops"]
  moved = full["flops_ratio"] - none["flops_ratio"]
  assert moved == pytest.approx(full["remat_flops"] / full["useful_flops"], rel=0.01), (moved, full, none)


def test_cost_cli_fields_and_unknown_chip():
  """--cost --json: each program's cost object and the report's chip and training fields, all numeric; an
  unknown chip kind is one line naming it (exit 2), before anything compiles."""
  small = ["model_preset.vocab_size = 512", "SFTDataConfig.seq_len = 128"]
  proc, rep = _preflight("--gin_file", TINY_SFT, *_gin(small), "--topology", "cpu:1", "--platform", "cpu", "--cost",
                         "--chip", "H100", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "roofline on H100" in proc.stdout and "MFU ceiling" in proc.stdout
  for p in rep["programs"]:
    for k in ("flops", "hbm_bytes", "useful_flops", "useful_hbm_bytes", "flops_ratio", "hbm_bytes_ratio",
              "roofline_seconds"):
      assert isinstance(p["cost"][k], float) and p["cost"][k] > 0, (k, p["cost"])
    assert "trip counts" in p["cost"]["counted"]
  assert rep["chip"] == json.loads(json.dumps(cost.chip("h100").to_json()))
  for k in ("step_seconds", "tokens_per_second", "mfu_ceiling", "run_hours", "chip_hours"):
    assert isinstance(rep[k], float) and rep[k] > 0, k
  proc, _ = _preflight("--gin_file", TINY_SFT, "--topology", "cpu:1", "--cost", "--chip", "v9x")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1 and "'v9x'" in err[0] and "v5p" in err[0], proc.stderr


def test_chip_table_matches_hardware_peaks():
  """One set of published numbers: the roofline's chips and the MFU denominators of rrjax.hardware agree."""
  for kind, name in (("v4", "TPU v4"), ("v5e", "TPU v5 lite"), ("v5p", "TPU v5"), ("v6e", "TPU v6"),
                     ("A100", "A100"), ("H100", "H100"), ("H200", "H200")):
    c = cost.chip(kind)
    assert cost.chip_for_device_kind(name if kind != "v6e" else "TPU v6 lite") is c
    assert c.peak_flops == hardware.PEAK_FLOPS_BF16[name], kind
    assert c.source.startswith("https://")
  with pytest.raises(ValueError, match="'B200'"):
    cost.chip("B200")
