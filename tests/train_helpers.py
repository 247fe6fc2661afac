"""Shared pieces of tests/test_train.py, also run as a subprocess worker.

  python tests/train_helpers.py devices8 OUT.npz
      (with XLA_FLAGS=--xla_force_host_platform_device_count=8): trains with
      jit over an 8-device mesh and with pmap over 8 devices.
  python tests/train_helpers.py distributed PROCESS_ID PORT WORKDIR OUT.npz
      one of two processes of a jax.distributed run on localhost (gloo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

IMAGE_SIZE = 8
NUM_EXAMPLES = 256
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def subprocess_env(*, devices: Optional[int] = None,
                   **extra: str) -> dict[str, str]:
  """The environment of a test's subprocess: this checkout first on
  PYTHONPATH; this process's variables, XLA flags (e.g. the fast-compile one
  of tests/conftest.py) and JAX compilation cache (every compilation written
  to it), except that the CPU device count is `devices` (None: XLA's
  default, one) whatever this process was given; then `extra`.

  Where glibc and the kernel allow it, malloc already uses huge pages
  (`hugepages.MALLOC_TUNABLE`), so a CPU training run of the command line
  does not restart itself for it (1.3-1.7 s of imports per run); a test of
  that restart passes GLIBC_TUNABLES="" in `extra`.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] +
                                      [p for p in [env.get("PYTHONPATH")] if p])
  flags = [
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith(DEVICE_COUNT_FLAG)
  ]
  if devices is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  # A child writes every compilation to the cache: each start compiles them
  # all again.
  env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  from ddpm_jax.infra import hugepages  # pylint: disable=g-import-not-at-top
  tunables = env.get("GLIBC_TUNABLES", "")
  if ("glibc.malloc.hugetlb" not in tunables and
      hugepages.huge_page_malloc_supported()):
    env["GLIBC_TUNABLES"] = ":".join(
        filter(None, [tunables, hugepages.MALLOC_TUNABLE]))
  env.update(extra)
  return env


def load_digits(n: int = NUM_EXAMPLES) -> np.ndarray:
  """The first n of scikit-learn's bundled 8x8 digits (no download, no data
  folder) as float32 [n, 8, 8, 1] in [-1, 1]: 17 grey levels, k -> k/8 - 1.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  x = datasets.load_digits().images[:n]
  return (x.astype(np.float32) / 8.0 - 1.0)[..., None]


def tiny_model(dtype: str = "float32", dropout: float = 0.0):
  """A ~3k-parameter conv denoiser with a time embedding."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class TinyDenoiser(nn.Module):
    features: int = 16
    dtype: str = "float32"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, t, train: bool = False):
      freqs = jnp.exp(-jnp.arange(4, dtype=jnp.float32))
      emb = jnp.concatenate(
          [jnp.sin(t[:, None] * freqs),
           jnp.cos(t[:, None] * freqs)], axis=-1)
      emb = nn.Dense(self.features, dtype=self.dtype)(emb)
      h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(x)
      h = nn.swish(h + emb[:, None, None, :])
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      h = nn.swish(nn.Conv(self.features, (3, 3), dtype=self.dtype)(h))
      return nn.Conv(x.shape[-1], (3, 3),
                     dtype=self.dtype)(h).astype(jnp.float32)

  return TinyDenoiser(dtype=dtype, dropout=dropout)


def make_config(**train_overrides):
  """A small config: the project's schema with test-sized values."""
  from ddpm_jax.engine.config import base_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.seed = 42
  c.data.update(
      dict(source="digits", image_size=IMAGE_SIZE, channels=1, resize=False))
  c.diffusion.update(dict(schedule="linear", num_timesteps=1000))
  c.optimizer.update(dict(lr=2e-3, warmup_steps=2, decay="cosine"))
  c.train.update(
      dict(batch_size=8, num_steps=6, ema_decay=0.999, ema_warmup=True,
           log_every=2, checkpoint_every=2, keep_checkpoints=2,
           max_nonfinite_steps=3, sample_every=0))
  c.train.update(train_overrides)
  return c


class ArrayDataset:
  """Deterministic per-host batches over an array, with get/set_state.

  Global batch j is rows [j*G, (j+1)*G) (cycling); process p gets its
  contiguous slice, so the assembled global batch does not depend on the
  number of processes.
  """

  def __init__(self, images, batch_size, process_index=0, process_count=1,
               nan_from=None):
    self.images, self.batch_size = images, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.nan_from = nan_from
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    g = self.batch_size * self.process_count
    j = self.position % (len(self.images) // g)
    start = j * g + self.process_index * self.batch_size
    batch = self.images[start:start + self.batch_size].copy()
    if self.nan_from is not None and self.position >= self.nan_from:
      batch[:] = np.nan
    self.position += 1
    return {"image": batch, "label": np.zeros((self.batch_size,), np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def dataset_factory(images, **kwargs):

  def factory(config, *, batch_size, process_index, process_count):
    del config
    return ArrayDataset(images, batch_size, process_index, process_count,
                        **kwargs)

  return factory


def flat(tree) -> dict[str, np.ndarray]:
  """{'path': array} of a pytree (for npz files and comparisons)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {
      jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves
  }


def run_mesh(config, images, num_steps, devices=None):
  """num_steps of the jitted step over a mesh; returns (losses, params)."""
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import builders, train_step  # pylint: disable=g-import-not-at-top
  from ddpm_jax.infra import parallel
  mesh = parallel.create_mesh(devices)
  model = tiny_model()
  tx = builders.build_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  state = train_step.create_train_state(model, tx, rng,
                                        image_shape=images.shape[1:], mesh=mesh)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, state)
  b = config.train.batch_size
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  losses = []
  for i in range(num_steps):
    batch = {"image": jax.device_put(images[i * b:(i + 1) * b], data)}
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  return np.array(losses), flat(state.params)


def run_pmap(config, images, num_steps):
  """The same training with jax.pmap over all local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import builders, train_step  # pylint: disable=g-import-not-at-top
  n = jax.local_device_count()
  model = tiny_model()
  tx = builders.build_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  state = jax.jit(lambda r: train_step.init_train_state(
      model, tx, r, image_shape=images.shape[1:]))(rng)
  state = jax.tree.map(lambda x: jnp.stack([x] * n), state)
  step = jax.pmap(
      builders.build_train_step(config, model, tx, axis_name="batch"),
      axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))
  b = config.train.batch_size
  losses = []
  for i in range(num_steps):
    x = images[i * b:(i + 1) * b].reshape((n, b // n) + images.shape[1:])
    state, metrics = step(state, {"image": x}, rng)
    losses.append(float(metrics["loss"][0]))
  return np.array(losses), flat(jax.tree.map(lambda x: x[0], state.params))


def _main(argv):
  mode = argv[1]
  if mode == "devices8":
    import jax  # pylint: disable=g-import-not-at-top
    assert jax.device_count() == 8, jax.devices()
    config = make_config(batch_size=16)
    images = load_digits()
    mesh_losses, mesh_params = run_mesh(config, images, 3)
    pmap_losses, pmap_params = run_pmap(config, images, 3)
    np.savez(argv[2], mesh_losses=mesh_losses, pmap_losses=pmap_losses, **{
        "mesh" + k: v for k, v in mesh_params.items()
    }, **{
        "pmap" + k: v for k, v in pmap_params.items()
    })
  elif mode == "distributed":
    process_id, port, workdir, out = (int(argv[2]), argv[3], argv[4], argv[5])
    from ddpm_jax.engine import train  # pylint: disable=g-import-not-at-top
    from ddpm_jax.infra import parallel
    assert parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
    import jax  # pylint: disable=g-import-not-at-top
    assert jax.process_count() == 2 and jax.device_count() == 2
    state = train.train_and_evaluate(
        make_config(), workdir, model=tiny_model(),
        dataset_factory=dataset_factory(load_digits()))
    np.savez(
        out, step=np.asarray(state.step.addressable_data(0)), **{
            "params" + k: np.asarray(v.addressable_data(0))
            for k, v in _leaves(state.params)
        }, **{
            "ema" + k: np.asarray(v.addressable_data(0))
            for k, v in _leaves(state.ema_params)
        })
  else:
    raise SystemExit(f"unknown mode {mode}")


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [(jax.tree_util.keystr(k), v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)]


if __name__ == "__main__":
  _main(sys.argv)
