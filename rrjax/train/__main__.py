"""python -m rrjax.train --gin_file F [--gin_file F2 ...] [--gin_param 'name.field = value' ...]

t5x-style: also `--gin.TrainConfig.num_steps=100`. gin exists only here: it fills the frozen dataclasses
(TrainConfig and its parts) that the library uses. The gin file picks the trainer (`TrainConfig.trainer`);
both run through rrjax.train.loop.run. Running again with the same TrainConfig.run_dir resumes.
"""

from __future__ import annotations

import argparse

import gin

from rrjax import cli, gin_config, hardware
from rrjax.model.qwen2 import Qwen2Config
from rrjax.sharding import MeshConfig
from rrjax.train import config as config_lib


@gin.configurable
def model_preset(name: str = "tiny", *, param_dtype: str | None = None, dtype: str | None = None,
                 attention: str = "auto", scan_layers: bool = True, remat: str = "full",
                 **architecture) -> Qwen2Config:
  """A preset ("0.5b" ... "72b" for Qwen2.5, "qwen3_0_6b" ... "qwen3_32b", "tiny") with this run's policy;
  architecture overrides allowed. remat defaults to 'full' (each layer keeps only its input for the backward
  pass), what long sequences need; see rrjax.model.qwen2.REMAT_POLICIES for the others."""
  return Qwen2Config.preset(name, param_dtype=param_dtype or "float32", dtype=dtype or hardware.default_dtype(),
                            attention=attention, scan_layers=scan_layers, remat=remat, **architecture)


def _register():
  for cls in (config_lib.TrainConfig, config_lib.OptimizerConfig, config_lib.CheckpointConfig,
              config_lib.LoraConfig, config_lib.SFTDataConfig, config_lib.GRPOConfig, config_lib.RLDataConfig,
              MeshConfig):
    gin.external_configurable(cls, module="rrjax")


_register()


@gin.configurable
def train(config: config_lib.TrainConfig = gin.REQUIRED) -> config_lib.TrainConfig:
  """The run's TrainConfig (gin: `train.config = @TrainConfig()`)."""
  return config


def trainers() -> dict:
  from rrjax.train import grpo, sft
  return {"sft": sft.SFTTrainer, "grpo": grpo.GRPOTrainer}


def parse_flags(argv):
  parser = argparse.ArgumentParser(
      prog="python -m rrjax.train", description=__doc__.splitlines()[0],
      usage="%(prog)s --gin_file FILE [--gin_file FILE ...] [--gin_param BINDING ...] [--gin.NAME=VALUE ...] "
            "[multi-host flags]",
      epilog="A binding can also be given t5x-style: --gin.NAME=VALUE (e.g. --gin.TrainConfig.num_steps=100, "
             "--gin.TrainConfig.run_dir=\"'runs/x'\"), the same as --gin_param 'NAME = VALUE'. Flags take "
             "their value as --flag VALUE or --flag=VALUE. A config name resolves against the working directory "
             "first, then rrjax's configs (sft/tiny_cpu.gin, grpo/reasonrank_7b.gin, ...).")
  parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                      help="gin binding such as 'TrainConfig.num_steps = 100' (repeatable; applied after the files)")
  from rrjax import distributed
  distributed.add_flags(parser)
  args, rest = parser.parse_known_args(argv)
  for extra in rest:
    if extra.startswith("--gin.") and "=" in extra:
      name, value = extra[len("--gin."):].split("=", 1)
      args.gin_param.append(f"{name} = {value}")
    else:
      parser.error(f"unrecognized argument {extra!r}")
  if not args.gin_file and not args.gin_param:
    parser.error("give at least one --gin_file")
  return args


def parse_config(gin_files, gin_params) -> config_lib.TrainConfig:
  config = gin_config.parse(gin_files, gin_params, train)
  if config.trainer not in trainers():
    raise ValueError(f"TrainConfig.trainer: {config.trainer!r} is not one of {sorted(trainers())}")
  return config


def run(gin_files, gin_params):
  """Parses the gin configuration and trains; returns (TrainConfig, final TrainState)."""
  from rrjax.train import loop
  config = parse_config(gin_files, gin_params)
  return config, loop.run(config, trainers()[config.trainer], operative_config=gin.operative_config_str())


def main(argv=None) -> int:
  args = parse_flags(argv)
  from rrjax import distributed
  distributed.initialize_from_args(args)  # a no-op on one host
  run(args.gin_file, args.gin_param)
  return 0


def console() -> None:
  """The `rrjax-train` console script (errors are prefixed with the script's name)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main, prog="rrjax.train")
