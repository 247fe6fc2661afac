"""Class-conditional training with label dropout and learned variances
(L_hybrid) through train_step and train_and_evaluate, then guided sampling
and bits/dim of the run. A tiny conditional denoiser on random 8x8 images:
no data files needed."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax.engine import (
    builders,
    evaluation,
    generation,
    inference,
    train,
    train_step,
)
from ddpm_jax.engine import config as config_lib

NUM_CLASSES = 3
IMAGE_SHAPE = (8, 8, 1)


class TinyDenoiser(nn.Module):
  """A conv denoiser with a time embedding, an optional class embedding
  (`num_embeddings` classes, the null class included) and an optional
  variance head of its own (`var_head`, read only for learned variances)."""
  num_embeddings: int = 0
  learned_variance: bool = False

  @nn.compact
  def __call__(self, x, t, *, y=None, train: bool = False):
    del train
    freqs = jnp.exp(-jnp.arange(4, dtype=jnp.float32))
    emb = jnp.concatenate(
        [jnp.sin(t[:, None] * freqs),
         jnp.cos(t[:, None] * freqs)], axis=-1)
    emb = nn.Dense(8)(emb)
    if self.num_embeddings:
      emb = emb + nn.Embed(self.num_embeddings, 8)(y)
    h = nn.swish(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
    out = nn.Conv(x.shape[-1], (3, 3))(h)
    if self.learned_variance:
      var = nn.Conv(x.shape[-1], (3, 3), name="var_head")(h)
      out = jnp.concatenate([out, jnp.tanh(var)], axis=-1)
    return out


def _config(**diffusion):
  config = config_lib.base_config()
  config.seed = 5
  config.data.update(image_size=8, channels=1, num_classes=NUM_CLASSES)
  config.diffusion.update(schedule="cosine", num_timesteps=20, **diffusion)
  config.optimizer.update(lr=1e-2, warmup_steps=0)
  config.train.update(batch_size=16, num_steps=4, log_every=2,
                      checkpoint_every=2, sample_every=4, p_uncond=0.25)
  config.sample.update(sampler="ddpm", ddpm_steps=5, num_images=8, batch_size=8,
                       gif_frames=2, guidance_scale=2.0)
  config.eval.update(num_images=8, batch_size=8)
  return config


def _batch(index: int, size: int = 16):
  rng = np.random.default_rng(index)
  return {
      "image": rng.integers(0, 256, (size,) + IMAGE_SHAPE) / 127.5 - 1.0,
      "label": rng.integers(0, NUM_CLASSES, (size,)).astype(np.int32)
  }


@functools.cache
def _initial_state(model):
  tx = builders.build_optimizer(_config())
  return jax.jit(lambda r: train_step.init_train_state(
      model, tx, r, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES))(
          jax.random.key(0))


def _step_fn(config, model, **options):
  """The jitted step of `config` and `model`, and their initial state (the
  optimizer settings are `_config()`'s)."""
  tx = builders.build_optimizer(config)
  step = builders.build_train_step(config, model, tx, **options)
  return step, _initial_state(model)


# ---------------------------------------------------------------------------
# Label dropout.


def test_label_dropout_rate_and_determinism():
  labels = jnp.arange(40_000, dtype=jnp.int32) % 10
  key = jax.random.key(4)
  dropped = np.asarray(
      train_step.drop_batch_labels(key, labels, p_uncond=0.2, num_classes=10))
  is_null = dropped == 10
  # 4.5 standard deviations of the binomial rate.
  assert abs(is_null.mean() - 0.2) < 4.5 * math.sqrt(0.16 / 40_000)
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
  np.testing.assert_array_equal(
      dropped,
      train_step.drop_batch_labels(key, labels, p_uncond=0.2, num_classes=10))
  other = train_step.drop_batch_labels(jax.random.key(5), labels, p_uncond=0.2,
                                       num_classes=10)
  assert not np.array_equal(dropped, other)


def test_label_dropout_per_device_slices_equal_the_global_batch():
  """Under a named axis of 4 shards (pmap's view; vmap names it the same
  way) each shard drops exactly its slice of the global batch's labels."""
  labels = jnp.arange(64, dtype=jnp.int32) % 10
  key = jax.random.key(1)
  whole = train_step.drop_batch_labels(key, labels, p_uncond=0.5,
                                       num_classes=10)
  sliced = jax.vmap(
      lambda y: train_step.drop_batch_labels(key, y, p_uncond=0.5, num_classes=
                                             10, axis_name="d"),
      axis_name="d")(labels.reshape(4, 16))
  np.testing.assert_array_equal(sliced.reshape(-1), whole)


@pytest.mark.slow
def test_conditional_step_is_the_same_sharded():
  config = _config()
  model = TinyDenoiser(num_embeddings=NUM_CLASSES + 1)
  step, state = _step_fn(config, model)
  batch = jax.tree.map(jnp.asarray, _batch(0))
  rng = jax.random.key(7)
  new, metrics = jax.jit(step)(state, batch, rng)
  sharded_step, _ = _step_fn(config, model, axis_name="d")
  shards = jax.tree.map(lambda a: a.reshape((4, 4) + a.shape[1:]), batch)
  new4, metrics4 = jax.jit(
      jax.vmap(sharded_step, in_axes=(None, 0, None),
               axis_name="d"))(state, shards, rng)
  np.testing.assert_allclose(metrics4["loss"], float(metrics["loss"]),
                             rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda p: p[1], new4.params),
                              new.params, rtol=1e-4, atol=1e-6)


def test_dropped_labels_reach_the_model_as_the_null_class():
  """p_uncond = 1 trains exactly as if every label were the null class; the
  labels matter (p_uncond = 0 differs)."""
  model = TinyDenoiser(num_embeddings=NUM_CLASSES + 1)
  batch = jax.tree.map(jnp.asarray, _batch(1))
  null_batch = dict(batch, label=jnp.full_like(batch["label"], NUM_CLASSES))
  rng = jax.random.key(2)

  steps = {}
  for p_uncond in (0.0, 1.0):
    config = _config()
    config.train.p_uncond = p_uncond
    step, state = _step_fn(config, model)
    steps[p_uncond] = jax.jit(step)

  def embedding(p_uncond, b):
    return np.asarray(steps[p_uncond](state, b,
                                      rng)[0].params["Embed_0"]["embedding"])

  all_dropped = embedding(1.0, batch)
  np.testing.assert_array_equal(all_dropped, embedding(0.0, null_batch))
  assert not np.array_equal(embedding(0.0, batch), all_dropped)
  # Dropped labels train the null class only.
  moved = np.any(
      all_dropped != np.asarray(state.params["Embed_0"]["embedding"]), axis=1)
  np.testing.assert_array_equal(moved, [False] * NUM_CLASSES + [True])


@pytest.mark.parametrize("var_type, trains_variance", [("fixed_large", False),
                                                       ("learned_range", True)])
def test_learned_variances_train_their_channels(var_type, trains_variance):
  """L_hybrid's bound term reaches the variance head; the fixed variances'
  loss never reads it."""
  config = _config(var_type=var_type)
  model = TinyDenoiser(num_embeddings=NUM_CLASSES + 1, learned_variance=True)
  step, state = _step_fn(config, model)
  new, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, _batch(2)),
                               jax.random.key(3))
  assert math.isfinite(float(metrics["loss"]))
  before = state.params["var_head"]["kernel"]
  after = new.params["var_head"]["kernel"]
  assert bool(jnp.any(before != after)) == trains_variance


# ---------------------------------------------------------------------------
# The whole engine: train, grids, sample, bits/dim.


class _Batches:
  """Random 8-bit images with labels, with get/set_state."""

  def __init__(self, batch_size):
    self.batch_size, self.position = batch_size, 0

  def __next__(self):
    self.position += 1
    return _batch(self.position, self.batch_size)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cond_learned")
  config = _config(var_type="learned_range")
  model = TinyDenoiser(num_embeddings=NUM_CLASSES + 1, learned_variance=True)
  state = train.train_and_evaluate(
      config, str(workdir), model=model,
      dataset_factory=lambda config, *, batch_size, **_: _Batches(batch_size))
  return config, model, workdir, state


def test_conditional_learned_variance_run_trains_and_grids(trained_run):
  _, _, workdir, state = trained_run
  assert int(state.step) == 4
  # 8 grid images over 3 classes: one row of 2 per class, 8x8 images
  # scaled 8x, 2 px of padding.
  grid = Image.open(workdir / "samples" / "step_00000004.png")
  assert grid.size == (2 * 66 + 2, NUM_CLASSES * 66 + 2)


def test_trained_run_samples_guided_and_evaluates(trained_run):
  config, model, workdir, state = trained_run
  trained = inference.load_trained(config, workdir, model=model)
  assert trained.num_classes == NUM_CLASSES
  chex.assert_trees_all_equal(jax.device_get(trained.params),
                              jax.device_get(state.ema_params))
  config.sample.update(num_images=5, gif=False)
  run = builders.build_run(config, model=model)
  generation.sample_to_files(trained, run.sampling, seed=run.seed,
                             workdir=workdir)
  with np.load(workdir / "samples" / "sample_step_00000004.npz") as f:
    assert f["images"].shape == (5,) + IMAGE_SHAPE
    np.testing.assert_array_equal(f["labels"], [0, 1, 2, 0, 1])

  def eval_batches():
    for i in range(2):
      batch = _batch(100 + i, 8)
      yield dict(batch, mask=np.ones((8,), bool))

  result = evaluation.bits_per_dim(trained, eval_batches(), num_images=12,
                                   key=jax.random.key(0), target="eps",
                                   var_type="learned_range", mean_form="x0",
                                   clip_x0=True)
  assert result["num_images"] == 12
  parts = result["prior_bpd"] + result["decoder_bpd"] + result["kl_bpd"]
  assert math.isfinite(result["total_bpd"]) and result["total_bpd"] > 0
  np.testing.assert_allclose(result["total_bpd"], parts, rtol=1e-5)
