"""A trained model, ready to sample: `load_trained(config, workdir)`.

The command line's `--mode=sample` and `--mode=eval` and the notebooks all
get their model here. Only the EMA parameters of the newest usable
checkpoint are read, so neither the optimizer nor its state is needed.

Example:
  >>> trained = load_trained(config, "/tmp/ddpm_digits")
  >>> sampler = builders.build_sampler(config)
  >>> out = jax.jit(lambda key: sampler.fn(
  ...     trained.model_fn, trained.schedule, shape=(16, 16, 16, 1),
  ...     key=key))(jax.random.key(0))

A class-conditional run's `trained.model_fn` takes labels, `(x_t, t, y)`;
its sampler guides it and needs `labels=builders.sample_labels(config, 16)`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from ddpm_jax.diffusion import gaussian, guidance
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.engine import builders, checkpoint, train_step
from ddpm_jax.infra import parallel, storage
from ddpm_jax.typing import PyTree


def make_model_fn(
    model: nn.Module, *, conditional: bool = False
) -> Callable[[PyTree], Callable[..., jnp.ndarray]]:
  """params -> the denoiser of `model` in eval mode.

  Args:
    model: a linen module called as `model.apply(variables, x, t, train=...)`
      (and `y=labels` when class-conditional).
    conditional: return the class-conditional denoiser `(x_t, t, y) ->
      output` (`guidance.CondModelFn`, y int [B], the null class included)
      instead of `(x_t, t) -> output`.

  Example:
    >>> model_fn = make_model_fn(unet)(params)
    >>> eps = model_fn(x_t, t)
  """

  def bind(params):
    if conditional:
      return lambda x_t, t, y: model.apply({"params": params}, x_t, t, y=y,
                                           train=False)
    return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)

  return bind


class Trained(NamedTuple):
  """What sampling needs from a training run."""
  model: nn.Module  # the network of config.model.
  params: PyTree  # its EMA parameters, replicated on `mesh`.
  schedule: Schedule  # the diffusion schedule of config.diffusion.
  step: int  # the training step of the checkpoint.
  mesh: Mesh  # the 'data' mesh the parameters live on.
  # C of a class-conditional run (the network also embeds the null class C);
  # 0 for an unconditional one.
  num_classes: int = 0

  @property
  def model_fn(self) -> gaussian.ModelFn | guidance.CondModelFn:
    """The denoiser with the EMA parameters: `(x_t, t) -> output`, or
    `(x_t, t, y) -> output` for a class-conditional run."""
    return self.bind(self.params)

  def bind(self, params: PyTree) -> Callable[..., jnp.ndarray]:
    """The denoiser of the model with `params` (`make_model_fn`)."""
    return make_model_fn(self.model, conditional=self.num_classes > 0)(params)


def trained_from_run(run: builders.Run, params: PyTree, *, step: int,
                     mesh: Mesh) -> Trained:
  """The `Trained` of `run`'s network with `params` (e.g. the EMA
  parameters of a train state) at training step `step`."""
  return Trained(model=run.model, params=params, schedule=run.schedule,
                 step=step, mesh=mesh, num_classes=run.num_classes)


def restore_trained(run: builders.Run, workdir: str | epath.PathLike, *,
                    mesh: Optional[Mesh] = None, step: Optional[int] = None,
                    ema: bool = True) -> Trained:
  """The EMA parameters of the newest usable checkpoint of a built run (or
  of checkpoint `step`; with `ema=False` the trained parameters); see
  `load_trained`.

  Args:
    run: the run the checkpoint was trained with (`builders.build_run`):
      its model, schedule, image shape and classes.
    workdir: the training workdir (checkpoints in `<workdir>/checkpoints`).
    mesh: the mesh to restore onto; default all devices on 'data'.
    step: a kept checkpoint's step; default the newest usable one.
    ema: the EMA parameters (True, what samples are drawn with) or the
      trained ones.

  Returns:
    A `Trained`.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    checkpoint.CheckpointError: checkpoints exist but none is usable, or
      checkpoint `step` is missing or broken.

  Example:
    >>> trained = restore_trained(builders.build_run(config), workdir)
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  directory = storage.as_path(workdir) / "checkpoints"
  no_checkpoint = FileNotFoundError(
      f"No checkpoint in {directory}: train first with --mode=train and this "
      "--workdir.")
  if parallel.any_process(not directory.is_dir()):  # Agreed by all hosts.
    raise no_checkpoint
  init_fn = functools.partial(train_step.init_params, run.model,
                              image_shape=run.image_shape,
                              num_classes=run.num_classes)
  # The EMA is float32; the trained parameters are of the model's dtype.
  as_stored = ((lambda p: p.astype(jnp.float32)) if ema else (lambda p: p))
  abstract = parallel.replicated_abstract(
      lambda rng: jax.tree.map(as_stored, init_fn(rng)),
      jax.ShapeDtypeStruct((2,), jnp.uint32), mesh=mesh)
  with checkpoint.CheckpointManager(directory, writable=False) as ckpt:
    if ckpt.latest_step() is None:
      raise no_checkpoint
    step, params = ckpt.restore_params(abstract, step=step, ema=ema)
  return trained_from_run(run, params, step=step, mesh=mesh)


def load_trained(config, workdir: str | epath.PathLike, *,
                 model: Optional[nn.Module] = None, mesh: Optional[Mesh] = None,
                 step: Optional[int] = None, ema: bool = True) -> Trained:
  """The EMA parameters of the newest usable checkpoint of a run (or of
  checkpoint `step`; with `ema=False` the trained parameters).

  Every process of a multi-host run must call it (the parameters are
  replicated over the whole mesh). Broken newer checkpoints are skipped
  with a warning, as training does, but nothing is moved.

  Args:
    config: the run config the checkpoint was trained with (`model`,
      `data.image_size`, `data.channels`, `data.num_classes`, `diffusion`),
      read by `builders.build_run`.
    workdir: the training workdir (checkpoints in `<workdir>/checkpoints`).
    model: the network; default `builders.build_model(config)` (pass the
      one given to `train.train_and_evaluate`, if any).
    mesh: the mesh to restore onto; default all devices on 'data'.
    step: a kept checkpoint's step (e.g. to follow quality over training);
      default the newest usable one.
    ema: the EMA parameters (True, what samples are drawn with) or the
      trained ones.

  Returns:
    A `Trained`.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    checkpoint.CheckpointError: checkpoints exist but none is usable, or
      checkpoint `step` is missing or broken.
  """
  return restore_trained(builders.build_run(config, model=model), workdir,
                         mesh=mesh, step=step, ema=ema)
