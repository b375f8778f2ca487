"""What a new user meets first: rrjax used from a plain Python script is quiet, and the README's how-tos run as
written (at reduced sizes)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path, timeout=300, **env_extra):
  """Runs `code` as a user's script would: a fresh interpreter, no JAX_PLATFORMS, no simulated devices."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(code))
  return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_import_load_and_generate_print_nothing_and_tpu_compiles_still_work(tmp_path):
  proc = _python("""
      import importlib.util, sys
      import rrjax
      from flax import nnx
      from rrjax.model.qwen2 import Qwen2, Qwen2Config

      rrjax.save_pretrained(Qwen2(Qwen2Config.tiny(), rngs=nnx.Rngs(0)), "tiny")
      model = rrjax.from_pretrained("tiny")
      out = rrjax.generate(model, [[1, 2, 3]], max_new_tokens=4)
      print("tokens", len(out.tokens[0]))
      sys.stdout.flush()
      print("=== topology", file=sys.stderr, flush=True)  # below: the TPU compiler, as preflight uses it
      if importlib.util.find_spec("libtpu") is not None:
        import jax, jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding
        from rrjax import preflight
        device = preflight.tpu_devices("v5e:2x2")[0]  # what preflight compiles for
        x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=SingleDeviceSharding(device))
        jax.jit(lambda a: a * 2).lower(x).compile()
        print("tpu compiled for", device.device_kind)
      """, tmp_path, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another process's libtpu lock would hide what it prints
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tokens 4" in proc.stdout
  before, _, _ = proc.stderr.partition("=== topology")
  assert before == "", before  # nothing from libtpu (or anyone) while importing, loading and generating
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    assert "tpu compiled for TPU v5" in proc.stdout, proc.stdout
