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
