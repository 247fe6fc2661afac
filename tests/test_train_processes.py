"""Training and sampling on the EDM and flow-matching processes: the config
fields and their checks, the builders, the train step and a tiny end-to-end
run per process (tests/train_helpers.py's ~3k-parameter denoiser on 8x8
digits, as tests/test_train.py)."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax import samplers  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.diffusion import guidance, ode_likelihood, processes  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.engine import (
    builders,
    evaluation,
    generation,
    inference,
    train,
    train_step,
)
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import images as image_lib
from ddpm_jax.infra import parallel

# rtol = atol of the ODE solver (1e-5 by default): a random net's ODE is
# stiff, and this one's steps run at XLA's lowest optimization level.
TOLERANCE = 1e-3
SETTINGS = {
    "edm": dict(target="x0", sampler="edm", spacing="karras"),
    "flow": dict(target="velocity", sampler="heun", spacing="uniform"),
}


def _config(process, **train_overrides):
  config = helpers.make_config(**train_overrides)
  settings = SETTINGS[process]
  config.diffusion.process = process
  config.diffusion.target = settings["target"]
  config.diffusion.clip_x0 = False
  config.sample.sampler = settings["sampler"]
  config.sample.solver_spacing = settings["spacing"]
  config.sample.num_steps = 4
  return config


@pytest.fixture(scope="module")
def images():
  return helpers.load_digits()


def test_builders_make_the_processes():
  config = _config("edm")
  config.diffusion.edm.update(dict(sigma_max=40.0, rho=5.0))
  assert builders.build_schedule(config) == processes.EDM(
      sigma_max=40.0, rho=5.0)
  config = _config("flow")
  config.diffusion.flow.update(
      dict(time_sampling="logit_normal", location=0.5, scale=2.0, shift=3.0))
  assert builders.build_schedule(config) == processes.Flow(
      time_sampling="logit_normal", location=0.5, scale=2.0, shift=3.0)
  config = _config("edm")
  config.sample.update(dict(s_churn=10.0, s_tmin=0.1, s_tmax=0.0))
  sampler = builders.build_sampler(config)
  assert (sampler.name, sampler.num_steps, sampler.num_calls) == ("edm", 4, 7)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_build_sampler_wraps_the_network_and_binds_the_options(process):
  """The built sampler equals the library sampler on the process-wrapped
  network (EDM's preconditioning, flow's 1000 t), with every option."""
  config = _config(process)
  config.sample.update(dict(s_churn=10.0, s_tmin=0.1, s_tmax=20.0,
                            s_noise=1.01))
  process_obj = builders.build_schedule(config)
  net_fn = lambda x, t: jnp.tanh(x) * jnp.cos(t)[:, None]  # noqa: E731
  options = dict(num_steps=4, spacing=SETTINGS[process]["spacing"],
                 target=SETTINGS[process]["target"], clip_x0=False)
  if process == "edm":
    options.update(s_churn=10.0, s_tmin=0.1, s_tmax=20.0, s_noise=1.01)
  x_T = jax.random.normal(jax.random.key(3), (16, 2))
  key = jax.random.key(11)
  built = builders.build_sampler(config).fn(net_fn, process_obj, x_T=x_T,
                                            key=key)
  direct = samplers.get_sampler(SETTINGS[process]["sampler"])(
      processes.network_model_fn(process_obj, net_fn), process_obj, x_T=x_T,
      key=key, **options)
  np.testing.assert_array_equal(built.images, direct.images)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_guidance_on_every_process(process):
  """A class-conditional run guides the network's output, then the process
  wraps it: EDM's D and flow's velocity are affine in the network output,
  so this is guidance of the denoiser (or velocity) itself."""
  config = _config(process)
  config.data.num_classes = 2
  config.sample.guidance_scale = 2.0
  process_obj = builders.build_schedule(config)
  cond_fn = lambda x, t, y: jnp.tanh(x + y[:, None]) * jnp.cos(t)[:, None
                                                                 ]  # noqa: E731
  labels = np.array([0, 1] * 4, np.int32)
  x_T = jax.random.normal(jax.random.key(3), (8, 2))
  built = builders.build_sampler(config).fn(cond_fn, process_obj, x_T=x_T,
                                            key=jax.random.key(1),
                                            labels=labels)
  guided = guidance.classifier_free_guidance(cond_fn, labels=labels,
                                             num_classes=2, scale=2.0)
  direct = samplers.get_sampler(SETTINGS[process]["sampler"])(
      processes.network_model_fn(process_obj, guided), process_obj, x_T=x_T,
      key=jax.random.key(1), num_steps=4, spacing=SETTINGS[process]["spacing"],
      target=SETTINGS[process]["target"])
  np.testing.assert_array_equal(built.images, direct.images)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_train_step_lowers_the_process_loss(process, images):
  """40 steps of the tiny denoiser lower the loss on a fixed set of batches
  (EDM's weighted loss of the untrained net starts near 1)."""
  config = _config(process)
  config.optimizer.update(dict(lr=3e-3, decay="constant"))
  model = helpers.tiny_model()
  tx = builders.build_optimizer(config)
  mesh = parallel.create_mesh(jax.devices()[:1])
  rng = jax.random.key(1)
  state = train_step.create_train_state(model, tx, rng,
                                        image_shape=images.shape[1:], mesh=mesh)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, state)
  losses = []
  for i in range(60):
    state, metrics = step(state, {"image": images[(i % 4) * 16:][:16]}, rng)
    losses.append(float(metrics["loss"]))
  assert all(math.isfinite(v) for v in losses)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_train_then_sample_end_to_end(process, images, tmp_path):
  config = _config(process)
  state = train.train_and_evaluate(
      config, str(tmp_path), model=helpers.tiny_model(),
      dataset_factory=helpers.dataset_factory(images))
  assert int(state.step) == 6
  trained = inference.load_trained(config, str(tmp_path),
                                   model=helpers.tiny_model())
  assert trained.schedule == builders.build_schedule(config)
  sampler = builders.build_sampler(config)
  uint8 = generation.generate(trained.bind, trained.params, trained.schedule,
                              sample_fn=sampler.fn, num_images=8, batch_size=8,
                              image_shape=images.shape[1:],
                              key=jax.random.key(0), mesh=trained.mesh)
  assert uint8.shape == (8,) + images.shape[1:] and uint8.dtype == np.uint8
  # generate's batch equals the sampler drawing its own x_T (sigma_max N(0,
  # I) on EDM).
  direct = jax.jit(
      lambda key: sampler.fn(trained.model_fn, trained.schedule, shape=
                             (8,) + images.shape[1:], key=key).images)(
                                 jax.random.fold_in(jax.random.key(0), 0))
  np.testing.assert_array_equal(uint8, np.asarray(image_lib.to_uint8(direct)))
  # --mode=eval: the ODE's bits/dim of 8 images of the digits' eval split.
  config.eval.update(
      dict(bpd="ode", num_images=8, batch_size=8, ode_tolerance=TOLERANCE))
  config_lib.validate_config(config, mode="eval")
  results = evaluation.evaluate_run(
      builders.build_run(config, model=helpers.tiny_model()), str(tmp_path))
  assert set(results) == {"ode_bpd", "num_images"}, results
  assert results["num_images"] == 8 and 0 < results["ode_bpd"] < 20, results
  assert (tmp_path / "eval" / "step_00000006.json").exists()


@pytest.mark.parametrize("process", ["ddpm", "edm", "flow"])
def test_eval_ode_bits_per_dim_is_the_likelihood_of_the_masked_images(
    process, images):
  config = _config(process) if process != "ddpm" else helpers.make_config()
  schedule = builders.build_schedule(config)
  model = helpers.tiny_model()
  x = jnp.asarray(images[:4])
  params = model.init(jax.random.key(0), x, jnp.zeros((4,)))["params"]
  trained = inference.Trained(model=model, params=params, schedule=schedule,
                              step=0,
                              mesh=parallel.create_mesh(jax.devices()[:1]))
  key = jax.random.key(5)
  target = config.diffusion.target

  def evaluate(*mask):
    return evaluation.ode_bits_per_dim(
        trained,
        iter([
            dict(image=images[:4], label=np.zeros(4, np.int32),
                 mask=np.array(mask))
        ]), num_images=0, key=key, target=target, tolerance=TOLERANCE)

  first = evaluate(True, True, True, False)
  last = evaluate(False, False, False, True)
  every = evaluate(True, True, True, True)
  assert (first["num_images"], last["num_images"],
          every["num_images"]) == (3, 1, 4)
  # One program, one ODE for the batch, whatever the mask: the masked-out
  # image adds nothing to the mean.
  np.testing.assert_allclose(3 * first["ode_bpd"] + last["ode_bpd"],
                             4 * every["ode_bpd"], rtol=1e-5)
  assert abs(last["ode_bpd"] - first["ode_bpd"]) > 1e-3 * first["ode_bpd"]
  model_fn = trained.model_fn
  if process != "ddpm":
    model_fn = processes.network_model_fn(schedule, model_fn)

  @jax.jit
  def likelihood(x):
    return ode_likelihood.ode_log_likelihood(model_fn, schedule, x,
                                             target=target,
                                             key=jax.random.fold_in(key, 0),
                                             rtol=TOLERANCE, atol=TOLERANCE)

  direct = likelihood(x)
  # The same ODE and trace estimate; the programs differ in rounding, and
  # the adaptive steps follow it (within about the tolerance).
  np.testing.assert_allclose(first["ode_bpd"], np.mean(direct.bits_per_dim[:3]),
                             rtol=3 * TOLERANCE)
  np.testing.assert_allclose(last["ode_bpd"], direct.bits_per_dim[3],
                             rtol=3 * TOLERANCE)


BAD = [
    (dict(process="ddim"), "config.diffusion.process must be one of"),
    (dict(target="eps"),
     "config.diffusion.target 'eps' does not apply to the 'edm' process"),
    (dict(sampler="ddim"),
     "sampler 'ddim' does not apply to the 'edm' process"),
    (dict(sampler="ddpm"),
     "sampler 'ddpm' does not apply to the 'edm' process"),
    (dict(spacing="leading"),
     "config.sample.solver_spacing 'leading' applies to the ddpm process"),
    (dict(sigma_min=0.0), "config.diffusion.edm.sigma_min must be a number in"),
    (dict(rho=-7.0), "config.diffusion.edm.rho must be a number in (0.0"),
    (dict(sigma_min=100.0),
     "config.diffusion.edm.sigma_min (100.0) must be below"),
    (dict(loss_weighting="min_snr"),
     "config.diffusion.loss_weighting 'min_snr' applies to the ddpm"),
    (dict(s_tmin=2.0, s_tmax=1.0), "config.sample.s_tmax (1.0) must be 0"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[b[1] for b in BAD])
def test_bad_config_is_one_line(change, message):
  config = _config("edm")
  change = dict(change)
  for name in ("process", "target", "loss_weighting"):
    if name in change:
      config.diffusion[name] = change.pop(name)
  for name in ("sigma_min", "rho"):
    if name in change:
      config.diffusion.edm[name] = change.pop(name)
  if "spacing" in change:
    config.sample.solver_spacing = change.pop("spacing")
  config.sample.update(change)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate_config(config, mode="train")
  assert message in str(info.value) and "\n" not in str(info.value)


def test_flow_rejects_the_bound_and_eps():
  config = _config("flow")
  for bpd in ("bound", "both"):
    config.eval.bpd = bpd
    with pytest.raises(
        config_lib.ConfigError,
        match=f"config.eval.bpd '{bpd}': the variational bound "
        "is DDPM's; the flow process has the probability-flow "
        "ODE's bits/dim: --config.eval.bpd=ode"):
      config_lib.validate_config(config, mode="eval")
  for bpd in ("ode", "none"):
    config.eval.bpd = bpd
    config_lib.validate_config(config, mode="eval")
  config.diffusion.target = "eps"
  with pytest.raises(config_lib.ConfigError, match="'eps' does not apply"):
    config_lib.validate_config(config, mode="sample")


def test_ode_bits_per_dim_without_diffrax_is_one_line(monkeypatch):
  find_spec = config_lib.importlib.util.find_spec
  monkeypatch.setattr(
      config_lib.importlib.util, "find_spec", lambda name: None
      if name == "diffrax" else find_spec(name))
  config = _config("flow")
  config.eval.bpd = "ode"
  with pytest.raises(
      config_lib.ConfigError, match=r"config.eval.bpd 'ode' integrates the "
      r"probability-flow ODE with diffrax, which is not "
      r"installed: pip install -e \"\.\[likelihood\]\""):
    config_lib.validate_config(config, mode="eval")
  config_lib.validate_config(config, mode="train")


@pytest.mark.parametrize("path", [
    "configs/mnist_cpu_edm.py", "configs/mnist_cpu_edm.py:tiny",
    "configs/mnist_cpu_flow.py", "configs/mnist_cpu_flow.py:tiny",
    "configs/cifar10_edm.py", "configs/cifar10_edm.py:cond,tiny",
    "configs/cifar10_flow.py", "configs/cifar10_flow.py:cond,tiny"
])
def test_recipes_validate(path):
  config = config_lib.load_config(path)
  assert config.eval.bpd == "ode"
  for mode in ("train", "sample", "eval"):
    config_lib.validate_config(config, mode=mode)
  assert builders.build_schedule(config).name == config.diffusion.process
