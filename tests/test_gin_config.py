"""gin names resolve against the user's paths first, then rrjax's configs (rrjax.gin_config)."""

import pytest

from rrjax import gin_config
from rrjax.rerank import cli as rerank_cli
from rrjax.train import __main__ as train_entry


def test_names_resolve_to_the_configs_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert gin_config.resolve("sft/tiny_cpu.gin") == gin_config.CONFIG_ROOT / "sft" / "tiny_cpu.gin"
  assert gin_config.resolve("configs/sft/tiny_cpu.gin").samefile(gin_config.CONFIG_ROOT / "sft" / "tiny_cpu.gin")
  assert gin_config.resolve("bright.gin", subdir="rerank") == gin_config.CONFIG_ROOT / "rerank" / "bright.gin"
  config = train_entry.parse_config(["sft/reasonrank_32b_lora.gin"], [])  # includes sft/, model/, mesh/ files
  assert (config.model.name, config.mesh.fsdp, config.lora.rank) == ("Qwen2.5-32B-Instruct", -1, 32)
  with pytest.raises(ValueError, match=r"^sft/nope.gin: gin file not found$"):
    gin_config.resolve("sft/nope.gin")


def test_the_users_files_come_first(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mesh").mkdir()
  (tmp_path / "mesh" / "gpu_8.gin").write_text("TrainConfig.mesh = @MeshConfig()\nMeshConfig.tensor = 8\n")
  config = train_entry.parse_config(["sft/reasonrank_7b.gin"], [])  # its `include 'mesh/gpu_8.gin'` is ours
  assert config.mesh.tensor == 8 and config.model.name == "Qwen2.5-7B-Instruct"
  (tmp_path / "exp").mkdir()
  (tmp_path / "exp" / "base.gin").write_text("RerankSettings.window = 7\n")
  (tmp_path / "exp" / "mine.gin").write_text("include 'bright.gin'\ninclude 'base.gin'\nRerankSettings.stride = 3\n")
  settings = rerank_cli.settings_from_gin(["exp/mine.gin"])  # beside the file, then rrjax's rerank/
  assert (settings.window, settings.stride, settings.max_passage_tokens) == (7, 3, 512)


def test_recipes_carry_upstreams_values_and_cite_them():
  """ReasonRank's recipes (8421BCD/ReasonRank 06721fd): qwen_full_sft.yaml, qwen_lora_sft.yaml (lora_alpha 32:
  scale 1.0; 7 epochs), train_grpo.sh, train_grpo_lora.sh (total_epochs=1). Every number of a recipe gin names
  its upstream file and line, or says it is rrjax's own or the demo's."""
  import re
  sft7 = train_entry.parse_config(["sft/reasonrank_7b.gin"], [])
  sft32 = train_entry.parse_config(["sft/reasonrank_32b_lora.gin"], [])
  assert (sft7.num_epochs, sft7.batch_size, sft7.grad_accum, sft7.optimizer.lr, sft7.lora.rank) == (5, 64, 8, 5e-6, 0)
  assert sft7.loss_norm == "per_device_token_mean" and sft7.sft_data.packing == "samples"
  assert (sft32.num_epochs, sft32.optimizer.lr, sft32.lora.rank, sft32.lora.alpha, sft32.lora.scale) == (
      7, 1e-4, 32, 32.0, 1.0)
  for name, lr, rank in (("grpo/reasonrank_7b.gin", 1e-6, 0), ("grpo/reasonrank_32b_lora.gin", 1e-5, 32)):
    g = train_entry.parse_config([name], [])
    assert (g.num_steps, g.num_epochs, g.batch_size, g.optimizer.lr, g.lora.rank) == (0, 1, 16, lr, rank)
    assert (g.grpo.schedule_unit, g.grpo.updates_per_step, g.grpo.rollouts_per_prompt, g.grpo.kl_coef) == (
        "rollout_step", 2, 8, 0.001)
    assert g.checkpoint.every_steps == 25 and (not rank or g.lora.scale == 1.0)
  number = re.compile(r"^\S+\s*=\s*-?[0-9][0-9.e+-]*\s*(#.*)?$")
  cites = re.compile(r"(\b[A-Z]{1,2}:\d+|\.(sh|yaml|py):\d+|rrjax's own|demo value)")
  for path in sorted(p for d in ("sft", "grpo") for p in (gin_config.CONFIG_ROOT / d).glob("*.gin")):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
      if number.match(line):
        comment = line.split("#", 1)[1] if "#" in line else (lines[i - 1] if lines[i - 1].startswith("#") else "")
        assert cites.search(comment), f"{path.name}:{i + 1}: {line!r} cites no upstream file and line"
