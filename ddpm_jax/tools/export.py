r"""Exports a trained run as a diffusers folder that PyTorch users load unchanged.

  python -m ddpm_jax.tools.export --config=configs/cifar10.py \
      --workdir=/tmp/cifar10 --output=/tmp/cifar10-diffusers [--step=N]

writes a `DDPMPipeline` folder, local or gs:// (docs/export.md):

  OUTPUT/model_index.json
  OUTPUT/unet/config.json, OUTPUT/unet/diffusion_pytorch_model.safetensors
  OUTPUT/scheduler/scheduler_config.json
  OUTPUT/README.md   the model card: config, step, images seen, data set and
                     the workdir's eval/ figures (FID, KID, bits/dim)

with the EMA parameters of the newest usable checkpoint (or of `--step`), so
that `DDPMPipeline.from_pretrained(OUTPUT)` samples the trained model.
Everything is mapped and checked before anything is written, and the folder
is written under a temporary name and renamed at the end: a network or
schedule that diffusers cannot express, a workdir without checkpoints or an
existing output is one line on stderr, exit status 1, and nothing written.

Example:
  >>> export_run(config, "/tmp/cifar10", "/tmp/cifar10-diffusers")
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Optional

import jax
import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from ddpm_jax.engine import builders, checkpoint, inference
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import parallel, storage
from ddpm_jax.models import UNetConfig, count_params, pretrained

# What the model card reports of each `<workdir>/eval/step_N.json`.
EVAL_FIGURES = (("fid", "FID"), ("kid", "KID"), ("inception_score", "IS"),
                ("total_bpd", "bits/dim"), ("ode_bpd", "ODE bits/dim"))


def diffusion_settings(
    config: ml_collections.ConfigDict) -> pretrained.DiffusionSettings:
  """The `pretrained.DiffusionSettings` of `config.diffusion`."""
  diff = config.diffusion
  return pretrained.DiffusionSettings(
      schedule=str(diff.schedule), num_timesteps=int(diff.num_timesteps),
      beta_start=float(diff.beta_start), beta_end=float(diff.beta_end),
      var_type=str(diff.var_type), clip_x0=builders.ddpm_clips_x0(config),
      target=str(diff.target), mean_form=str(diff.mean_form))


def eval_results(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """The `<workdir>/eval/step_N.json` results, oldest step first (none
  without an eval/ folder)."""
  folder = storage.as_path(workdir) / "eval"
  if not storage.exists(folder, directory=True):
    return []
  results = []
  for path in sorted(folder.glob("step_*.json")):
    try:
      results.append(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
      raise config_lib.ConfigError(
          f"{path}: not a readable eval JSON file ({e})") from None
  return sorted(results, key=lambda r: r.get("step", -1))


def _figure(value: Any, std: Any = None) -> str:
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    return "-"
  if isinstance(std, (int, float)) and math.isfinite(std):
    return f"{value:.4g} ± {std:.2g}"
  return f"{value:.4g}"


def _eval_table(results: list[dict[str, Any]],
                config: ml_collections.ConfigDict) -> str:
  if not results:
    return ("No evaluation in the workdir's eval/ folder (run "
            "`python -m ddpm_jax.main --mode=eval` before exporting).\n")
  lines = [
      "| step | " + " | ".join(name for _, name in EVAL_FIGURES) +
      " | samples | bits/dim images |", "|---" * (len(EVAL_FIGURES) + 3) + "|"
  ]
  for r in results:
    figures = [_figure(r.get(k), r.get(k + "_std")) for k, _ in EVAL_FIGURES]
    lines.append(f"| {r.get('step', '-')} | " + " | ".join(figures) +
                 f" | {r.get('num_samples', '-')} | "
                 f"{r.get('num_images', '-')} |")
  return ("\n".join(lines) + "\n\nFID, KID and IS of `samples` images "
          f"drawn with the sampler of `sample` in the config below "
          f"(`{config.sample.sampler}`; the eval files do not record it); "
          "bits/dim: the variational bound of `bits/dim images` images of "
          "the eval split.\n")


def model_card(config: ml_collections.ConfigDict, unet: UNetConfig, *,
               step: int, num_params: int, results: list[dict[str, Any]],
               ema: bool = True) -> str:
  """The README.md of an exported run (`ema`: whether it holds the EMA
  parameters or the trained ones)."""
  data, batch = config.data, int(config.train.batch_size)
  conditional = unet.num_classes is not None
  usage = ("images = pipe(batch_size=4).images" if not conditional else
           "# class-conditional: call pipe.unet(x, t, class_labels=y)")
  body = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=repr)
  weights = "EMA parameters" if ema else "trained parameters (not the EMA)"
  return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- ddpm_jax
- ddpm
---

# DDPM trained with ddpm_jax

A {num_params:,}-parameter DDPM U-Net trained with ddpm_jax (JAX/Flax) and
exported by `python -m ddpm_jax.tools.export`: the {weights} of step
{step}.

```python
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained("path/to/this/folder")
{usage}
```

## Training

| | |
|---|---|
| step | {step:,} |
| training images seen | {step * batch:,} (batch {batch}) |
| data set | `{data.source}`, split `{data.split}` |
| images | {data.image_size}x{data.image_size}, {data.channels} channel(s) |
| classes | {int(data.num_classes) or "unconditional"} |
| diffusion | {config.diffusion.schedule} betas, T = \
{config.diffusion.num_timesteps}, target {config.diffusion.target}, variance \
{config.diffusion.var_type} |

## Evaluation

{_eval_table(results, config)}
## Config

```json
{body}
```
"""


def export_run(config: ml_collections.ConfigDict, workdir: epath.PathLike,
               output: epath.PathLike, *, step: Optional[int] = None,
               ema: bool = True) -> epath.Path:
  """Writes the run's EMA (or trained) parameters as a `DDPMPipeline`
  folder.

  Args:
    config: the run config it was trained with.
    workdir: the training workdir (local or gs://).
    output: the folder to create (local or gs://); it must not exist.
    step: a kept checkpoint's step; default the newest usable one.
    ema: the EMA parameters (True, what `--mode=sample` draws with) or the
      trained ones.

  Returns:
    The written folder.

  Raises:
    pretrained.PretrainedError: the network or diffusion settings cannot be
      exported (the field is named), or `output` exists.
    config_lib.ConfigError: an invalid config or eval file.
    FileNotFoundError, checkpoint.CheckpointError: no usable checkpoint.
    storage.StorageError: a gs:// path that cannot be used.
    Nothing is written in any case.
  """
  config_lib.validate_config(config, mode="sample")
  unet = config_lib.model_config(config)
  settings = diffusion_settings(config)
  image_size = int(config.data.image_size)
  if storage.exists(output):
    raise pretrained.PretrainedError(
        f"{output}: exists: export into a new folder (nothing was written)")
  pretrained.unet_config_to_diffusers(unet, image_size=image_size)
  pretrained.scheduler_config_to_diffusers(settings)
  trained = inference.load_trained(config, workdir, step=step, ema=ema)
  params = jax.device_get(trained.params)
  card = model_card(config, unet, step=trained.step,
                    num_params=count_params(params),
                    results=eval_results(workdir), ema=ema)
  return pretrained.save_diffusers(output, unet, params, settings,
                                   image_size=image_size, model_card=card)


USER_ERRORS = (pretrained.PretrainedError, config_lib.ConfigError,
               FileNotFoundError, checkpoint.CheckpointError,
               storage.StorageError)
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when this module runs as the
  program, so importing it next to `ddpm_jax.main` is safe)."""
  config_flags.DEFINE_config_file(
      "config", None, "The run config it was trained with, e.g. "
      "configs/cifar10.py.", lock_config=False, accept_new_attributes=True)
  flags.DEFINE_string("workdir", None, "The training workdir.")
  flags.DEFINE_string("output", None, "The diffusers folder to create.")
  flags.DEFINE_integer(
      "step", None, "A kept checkpoint's step; default the "
      "newest usable one.")
  flags.DEFINE_boolean(
      "ema", True, "Export the EMA parameters (what --mode=sample draws "
      "with); --ema=false exports the trained ones.")
  flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv) -> None:
  """Exports the run of --config in --workdir to the diffusers folder --output."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  parallel.quiet_backend_probe()
  try:
    folder = export_run(FLAGS.config, FLAGS.workdir, FLAGS.output,
                        step=FLAGS.step, ema=FLAGS.ema)
  except USER_ERRORS as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"Exported {FLAGS.workdir} to {folder}: load it with\n"
        f"  DDPMPipeline.from_pretrained({str(folder)!r})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
