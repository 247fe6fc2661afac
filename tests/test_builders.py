"""builders.build_sampler, the one place a config becomes a sampler: each
sampler with its options, respaced DDPM and classifier-free guidance, checked
for exact equality against the library functions called directly; the class
labels of samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.diffusion import guidance, respace, testing
from ddpm_jax.engine import builders, optim
from ddpm_jax.engine import config as config_lib

T = 40
MIX = testing.gaussian_mixture(weights=[0.5, 0.3, 0.2], means=[[-0.5, 0.2],
                                                               [0.4, -0.3],
                                                               [0.3, 0.6]],
                               stds=[0.1, 0.15, 0.2], labels=[0, 1, 1])


def _config(**sample):
  config = config_lib.base_config()
  config.diffusion.update(num_timesteps=T, schedule="cosine", target="x0",
                          var_type="fixed_small", mean_form="eps",
                          clip_x0=False)
  config.sample.update(sample)
  return config


@pytest.fixture(scope="module")
def sched():
  return builders.build_schedule(_config())


@pytest.fixture(scope="module")
def x_T():
  return jax.random.normal(jax.random.key(3), (16, 2))


KEY = jax.random.key(11)

# The options each sampler must get from `_config(**SAMPLE_FIELDS)`.
SAMPLE_FIELDS = dict(num_steps=7, ddpm_steps=0, eta=0.5,
                     ddim_spacing="quadratic", solver_spacing="karras")
SOLVER_OPTIONS = dict(num_steps=7, spacing="karras", target="x0", clip_x0=False)
EXPECTED = {
    "ddpm": (dict(target="x0", var_type="fixed_small", mean_form="eps",
                  clip_x0=False), T, T),
    "ddim": (dict(num_steps=7, eta=0.5, spacing="quadratic", target="x0",
                  clip_x0=False), 7, 7),
    "euler": (SOLVER_OPTIONS, 7, 7),
    "heun": (SOLVER_OPTIONS, 7, 13),
    "dpmpp_2m": (SOLVER_OPTIONS, 7, 7),
    "dpmpp_2m_sde": (SOLVER_OPTIONS, 7, 7),
    "dpmpp_3m": (SOLVER_OPTIONS, 7, 7),
}


def test_every_sampler_is_covered():
  # The edm sampler (EDM process only): tests/test_train_processes.py.
  assert set(EXPECTED) == set(samplers.PROCESS_SAMPLERS["ddpm"])


@pytest.mark.parametrize("name", samplers.PROCESS_SAMPLERS["ddpm"])
def test_build_sampler_binds_the_config_options(name, sched, x_T):
  sampler = builders.build_sampler(_config(sampler=name, **SAMPLE_FIELDS))
  options, num_steps, num_calls = EXPECTED[name]
  assert (sampler.name, sampler.num_steps,
          sampler.num_calls) == (name, num_steps, num_calls)
  model_fn = testing.denoiser(MIX, sched, target="x0")
  built = jax.jit(lambda x, k: sampler.fn(model_fn, sched, x_T=x, key=k,
                                          trajectory_every=3))(x_T, KEY)
  direct = jax.jit(lambda x, k: samplers.SAMPLER_FNS[name](
      model_fn, sched, x_T=x, key=k, trajectory_every=3, **options))(x_T, KEY)
  np.testing.assert_array_equal(built.images, direct.images)
  np.testing.assert_array_equal(built.trajectory, direct.trajectory)
  np.testing.assert_array_equal(built.trajectory_steps, direct.trajectory_steps)


# Data beyond [-1, 1], so that clipping the predicted x0 changes the samples.
WIDE = testing.gaussian_mixture(weights=[0.5, 0.5], means=[[-1.6, 0.3],
                                                           [1.5, -1.4]],
                                stds=[0.1, 0.2])
REFERENCE_CLIPS = {"ddpm": True}  # Ho et al.; the others (Song et al.'s
# DDIM, DPM-Solver++, Karras et al.) do not clip.


@pytest.mark.parametrize("clip_x0", [None, True, False])
@pytest.mark.parametrize("name", samplers.PROCESS_SAMPLERS["ddpm"])
def test_clipping_defaults_to_each_samplers_reference(name, clip_x0, sched,
                                                      x_T):
  config = _config(sampler=name, **SAMPLE_FIELDS)
  # DDPM's mean from the (clipped) x0, as Ho et al.; `eps` never clips.
  config.diffusion.update(clip_x0=clip_x0, mean_form="x0")
  sampler = builders.build_sampler(config)
  model_fn = testing.denoiser(WIDE, sched, target="x0")
  options = EXPECTED[name][0]
  if name == "ddpm":
    options = dict(options, mean_form="x0")
  run = jax.jit(
      lambda x, clip: samplers.SAMPLER_FNS[name]
      (model_fn, sched, x_T=x, key=KEY, **dict(options, clip_x0=clip)).images,
      static_argnums=1)
  built = jax.jit(lambda x: sampler.fn(model_fn, sched, x_T=x, key=KEY).images)
  expected = REFERENCE_CLIPS.get(name, False) if clip_x0 is None else clip_x0
  np.testing.assert_array_equal(built(x_T), run(x_T, expected))
  assert np.abs(run(x_T, True) - run(x_T, False)).max() > 1e-3
  assert builders.build_evaluation(config).bound_options["clip_x0"] is (
      clip_x0 is not False)


def test_respaced_ddpm_from_the_config(sched, x_T):
  sampler = builders.build_sampler(_config(sampler="ddpm", ddpm_steps=8))
  assert (sampler.num_steps, sampler.num_calls) == (8, 8)
  model_fn = testing.denoiser(MIX, sched, target="x0")
  out = jax.jit(lambda x: sampler.fn(model_fn, sched, x_T=x, key=KEY))(x_T)
  spaced = respace.respace(sched, respace.spaced_timesteps(T, 8))
  expected = jax.jit(lambda x: samplers.ddpm_sample(
      respace.map_timesteps(testing.denoiser(MIX, sched, target="x0"), spaced.
                            timesteps), spaced.schedule, x_T=x, key=KEY, target=
      "x0", var_type="fixed_small", mean_form="eps", clip_x0=False))(x_T)
  np.testing.assert_array_equal(out.images, expected.images)
  np.testing.assert_array_equal(spaced.timesteps,
                                [0, 6, 11, 17, 22, 28, 33, 39])
  with pytest.raises(ValueError, match="built for the run's schedule of 40 "
                     "steps, got 8"):
    sampler.fn(model_fn, spaced.schedule, x_T=x_T, key=KEY)


def test_ddpm_steps_0_and_t_are_plain_ddpm(sched, x_T):
  model_fn = testing.denoiser(MIX, sched, target="x0")
  fns = [
      builders.build_sampler(_config(sampler="ddpm", ddpm_steps=s)).fn
      for s in (0, T)
  ]
  outs = [
      jax.jit(lambda x, fn=fn: fn(model_fn, sched, x_T=x, key=KEY).images)(x_T)
      for fn in fns
  ]
  expected = jax.jit(lambda x: samplers.ddpm_sample(
      model_fn, sched, x_T=x, key=KEY, target="x0", var_type="fixed_small",
      mean_form="eps", clip_x0=False).images)(x_T)
  for out in outs:
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m"])
def test_guided_sampler_of_a_conditional_run(name, sched, x_T):
  config = _config(sampler=name, num_steps=6, ddpm_steps=10, guidance_scale=1.5)
  config.data.num_classes = 2
  sampler = builders.build_sampler(config)
  cond_fn = testing.conditional_denoiser(MIX, sched, target="x0")
  labels = jnp.asarray(builders.sample_labels(config, 16))
  out = jax.jit(
      lambda x, y: sampler.fn(cond_fn, sched, x_T=x, key=KEY, labels=y))(x_T,
                                                                         labels)
  spaced = respace.respace(sched, respace.spaced_timesteps(T, 10))

  def direct(x, y):
    guided = guidance.classifier_free_guidance(cond_fn, labels=y, num_classes=2,
                                               scale=1.5)
    if name == "ddpm":
      return samplers.ddpm_sample(
          respace.map_timesteps(guided, spaced.timesteps), spaced.schedule,
          x_T=x, key=KEY, target="x0", var_type="fixed_small", mean_form="eps",
          clip_x0=False)
    return samplers.dpmpp_2m_sample(guided, sched, x_T=x, num_steps=6,
                                    spacing="logsnr", target="x0")

  expected = jax.jit(direct)(x_T, labels)
  np.testing.assert_array_equal(out.images, expected.images)
  with pytest.raises(ValueError, match="labels .* are required"):
    sampler.fn(cond_fn, sched, x_T=x_T, key=KEY)


def test_labels_for_an_unconditional_run_are_an_error(sched, x_T):
  sampler = builders.build_sampler(_config(sampler="euler"))
  with pytest.raises(
      ValueError, match="labels were given to the sampler of "
      "an unconditional run"):
    sampler.fn(testing.denoiser(MIX, sched), sched, x_T=x_T, labels=jnp.zeros(
        (16,), jnp.int32))


def test_sample_labels():
  config = _config()
  assert builders.sample_labels(config, 5) is None
  config.data.num_classes = 3
  labels = builders.sample_labels(config, 7)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2, 0])
  config.sample.class_id = 2
  np.testing.assert_array_equal(builders.sample_labels(config, 3), [2, 2, 2])


def test_build_model_embeds_the_null_class():
  config = config_lib.load_config("configs/digits.py:cond,tiny")
  model = builders.build_model(config)
  assert model.config.num_classes == 11


def _run_config():
  config = _config(sampler="ddim", num_steps=7, num_images=10, batch_size=5,
                   gif=False, gif_frames=3, guidance_scale=1.5)
  config.seed = 7
  config.data.update(num_classes=3, image_size=8, channels=3)
  config.train.update(batch_size=4, num_steps=9, log_every=2,
                      checkpoint_every=3, keep_checkpoints=2, sample_every=4,
                      max_time=60.0, max_nonfinite_steps=5, profile_start=2,
                      profile_steps=1)
  config.eval.update(num_images=12, batch_size=6, num_samples=20,
                     ode_tolerance=1e-3, num_reference=30)
  return config


def test_build_run_holds_the_config_values():
  run = builders.build_run(_run_config())
  assert run.loop == builders.Loop(num_steps=9, batch_size=4, log_every=2,
                                   checkpoint_every=3, keep_checkpoints=2,
                                   sample_every=4, max_time=60.0,
                                   max_nonfinite_steps=5, profile_start=2,
                                   profile_steps=1)
  assert (run.image_shape, run.num_classes, run.seed) == ((8, 8, 3), 3, 7)
  assert run.model.config.num_classes == 4  # The classes and the null class.
  assert run.schedule.num_timesteps == T
  sampling = run.sampling
  assert (sampling.sampler.name, sampling.sampler.num_steps) == ("ddim", 7)
  assert (sampling.num_images, sampling.batch_size, sampling.gif,
          sampling.gif_frames, sampling.by_class, sampling.guidance_scale,
          sampling.image_shape) == (10, 5, False, 3, True, 1.5, (8, 8, 3))
  np.testing.assert_array_equal(sampling.labels(5), [0, 1, 2, 0, 1])
  assert run.evaluation == builders.Evaluation(
      batch_size=6, num_images=12, split="test", bpd="bound", target="x0",
      ode_tolerance=1e-3,
      bound_options=dict(target="x0", var_type="fixed_small", mean_form="eps",
                         clip_x0=False), inception_weights="",
      inception_preprocessing="tensorflow", num_samples=20, num_reference=30,
      reference_split="train", source="digits")
  expected_lr = optim.learning_rate_schedule(lr=2e-4, warmup_steps=5000,
                                             num_steps=9, decay="constant")
  for step in (0, 5, 9):
    assert run.learning_rate_fn(step) == expected_lr(step)


def test_build_run_takes_a_model_and_a_dataset_factory():
  model = builders.build_model(config_lib.load_config("configs/digits.py"))
  calls = []

  def factory(config, *, batch_size, process_index, process_count):
    calls.append((config.data.source, batch_size, process_index, process_count))
    return iter(())

  run = builders.build_run(_run_config(), model=model, dataset_factory=factory)
  assert run.model is model
  run.dataset(batch_size=2, process_index=1, process_count=2)
  assert calls == [("digits", 2, 1, 2)]


@pytest.mark.parametrize("class_id,expected", [(-1, [0, 1, 2, 0, 1]),
                                               (2, [2, 2, 2, 2, 2])])
def test_class_labels(class_id, expected):
  labels = builders.class_labels(5, num_classes=3, class_id=class_id)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, expected)
  assert builders.class_labels(5, num_classes=0, class_id=class_id) is None


def test_the_default_dataset_factory_reads_the_config_data():
  config = _run_config()
  config.data.update(image_size=8, channels=1, resize=False, num_classes=10)
  run = builders.build_run(config)
  batch = next(run.dataset(batch_size=4))
  direct = next(builders.build_dataset(config, batch_size=4))
  assert batch["image"].shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(batch["image"], direct["image"])
  np.testing.assert_array_equal(batch["label"], direct["label"])
  evaluated = next(run.dataset(batch_size=4, training=False))
  assert evaluated["mask"].shape == (4,)
