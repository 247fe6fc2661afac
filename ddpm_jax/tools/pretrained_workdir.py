r"""Imports a pretrained diffusers model into a workdir as an ordinary checkpoint.

  python -m ddpm_jax.tools.pretrained_workdir --source=ddpm-cifar10-32 \
      --workdir=/tmp/cifar10_pretrained [--config=configs/cifar10.py]

The workdir then holds `checkpoints/0` (params and EMA params equal to the
imported weights, a fresh optimizer state, step 0) and `config.py`, the run
config with the imported network, diffusion settings and image shape, so that
`--mode=sample`, `--mode=eval` and training (fine-tuning) run unchanged:

  python -m ddpm_jax.main --config=WORKDIR/config.py --workdir=WORKDIR \
      --mode=sample

Everything is read and validated before anything is written; a bad model,
config or workdir is one line on stderr and exit status 1.

Example:
  >>> run = import_to_workdir("ddpm-cifar10-32", "/tmp/cifar_pretrained",
  ...                         config=load_config("configs/cifar10.py"))
"""

from __future__ import annotations

import copy
import os
import pprint
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax.engine import builders, checkpoint, train_step
from ddpm_jax.engine import config as config_lib
from ddpm_jax.engine import workdir as workdir_lib
from ddpm_jax.infra import parallel
from ddpm_jax.models import PRESETS, UNetConfig, pretrained

CONFIG_FILE = "config.py"


def model_fields(unet: UNetConfig) -> dict[str, Any]:
  """`config.model` for `unet`: the closest preset plus the fields that differ.

  Example:
    >>> model_fields(unet_config("ddpm_cifar10", dropout=0.0))
    {'preset': 'ddpm_cifar10', 'dropout': 0.0}
  """
  fields = unet.to_dict()

  def diff(name: str) -> dict[str, Any]:
    preset = PRESETS[name].to_dict()
    return {k: v for k, v in fields.items() if preset[k] != v}

  best = min(sorted(PRESETS), key=lambda name: len(diff(name)))
  return {"preset": best, **diff(best)}


def run_config(config: ml_collections.ConfigDict,
               net: pretrained.Pretrained) -> ml_collections.ConfigDict:
  """A copy of `config` with the network, diffusion settings and image shape
  of `net` (config.model, config.diffusion, data.image_size, data.channels).

  A class-conditional network (`num_classes` = C + 1 embeddings, the last the
  null class of guidance) sets `data.num_classes` = C, from which the run
  config derives the network's embedding count.
  """
  run = copy.deepcopy(config)
  fields = model_fields(net.config)
  embeddings = fields.pop("num_classes", None)
  run.model = ml_collections.ConfigDict(fields)
  if embeddings is not None:
    run.data.num_classes = embeddings - 1
  run.diffusion.update(net.diffusion._asdict())
  if net.image_size is not None:
    run.data.image_size = net.image_size
  run.data.channels = net.config.in_channels
  return run


def _config_source(run: ml_collections.ConfigDict, source: str) -> str:
  body = pprint.pformat(run.to_dict(), width=72)
  body = "\n".join("      " + line for line in body.splitlines()).lstrip()
  return (
      f'"""Run config of the model imported from {source}.\n\n'
      "Written by ddpm_jax.tools.pretrained_workdir.import_to_workdir; pass it "
      "as --config\nwith this workdir.\n\"\"\"\n\nimport ml_collections\n\n"
      "\ndef get_config():\n"
      f"  return ml_collections.ConfigDict(\n      {body})\n")


def import_to_workdir(
    source: str | os.PathLike, workdir: str | os.PathLike, *,
    config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Writes a diffusers model into `workdir` as a step-0 training checkpoint.

  Args:
    source: a diffusers `UNet2DModel` folder (see `pretrained.load_diffusers`).
    workdir: a new or empty directory (no checkpoints, no config.py).
    config: the run config to start from (e.g. configs/cifar10.py's); its
      model, diffusion and image shape are replaced by the imported ones, the
      rest (optimizer, training, sampling, evaluation) is kept.

  Returns:
    The run config written to `<workdir>/config.py`.

  Raises:
    pretrained.PretrainedError: the model cannot be imported, or the workdir
      already holds a run. Nothing is written.
    config_lib.ConfigError: the resulting run config is invalid.
      Nothing is written.
  """
  source, workdir = os.fspath(source), os.fspath(workdir)
  net = pretrained.load_diffusers(source)
  run = run_config(config, net)
  config_lib.validate_config(run, mode="train")
  checkpoints = os.path.join(workdir, "checkpoints")
  config_path = os.path.join(workdir, CONFIG_FILE)
  for path in (checkpoints, config_path):
    if os.path.exists(path):
      raise pretrained.PretrainedError(
          f"{path} exists: import into a new workdir (nothing was written)")
  tx = builders.build_optimizer(run)
  state = train_step.TrainState(step=jnp.zeros((),
                                               jnp.int32), params=net.params,
                                ema_params=jax.tree.map(jnp.copy, net.params),
                                opt_state=tx.init(net.params),
                                nonfinite_count=jnp.zeros((), jnp.int32))
  # The base key a fresh run of this config trains with (train_and_evaluate).
  rng = jax.random.split(jax.random.PRNGKey(run.seed), 3)[1]
  os.makedirs(workdir, exist_ok=True)
  with checkpoint.CheckpointManager(checkpoints) as manager:
    manager.save(0, state, rng)
  tmp = config_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(_config_source(run, source))
  os.replace(tmp, config_path)
  workdir_lib.record_config(workdir, run)
  return run


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when this module runs as the
  program, so importing it next to `ddpm_jax.main` is safe)."""
  flags.DEFINE_string(
      "source", None, "A diffusers UNet2DModel folder (config.json, "
      "diffusion_pytorch_model.safetensors, scheduler_config.json).")
  flags.DEFINE_string("workdir", None, "A new or empty workdir.")
  config_flags.DEFINE_config_file(
      "config", None, "The run config to start from (optimizer, training, "
      "sampling, evaluation), e.g. configs/cifar10.py; default: the defaults "
      "of ddpm_jax/engine/config.py.", lock_config=False,
      accept_new_attributes=True)
  flags.mark_flags_as_required(["source", "workdir"])


def main(argv) -> None:
  """Imports the diffusers model --source into the new workdir --workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  parallel.quiet_backend_probe()
  config = FLAGS.config if FLAGS.config is not None else (
      config_lib.base_config())
  try:
    import_to_workdir(FLAGS.source, FLAGS.workdir, config=config)
  except (pretrained.PretrainedError, config_lib.ConfigError) as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Imported {FLAGS.source} into {FLAGS.workdir}: sample with\n"
        f"  python -m ddpm_jax.main --config={FLAGS.workdir}/{CONFIG_FILE} "
        f"--workdir={FLAGS.workdir} --mode=sample")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
