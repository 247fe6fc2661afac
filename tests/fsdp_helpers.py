"""The FSDP checks of tests/test_fsdp.py, run as a subprocess worker on 8
fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/fsdp_helpers.py WORKDIR OUT.npz

A tiny class-conditional DiT trains 5 steps on the same batches three ways:
data parallel over 8 devices, and FSDP over meshes ('data', 'fsdp') of
(1, 8) and (2, 4). OUT.npz gets the losses and final parameters of each, the
shard shapes of the (1, 8) state, and the parameters restored from the
(1, 8) run's checkpoint onto 1 device and onto a (4, 2) mesh, and from the
data-parallel run's checkpoint onto the (1, 8) mesh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

NUM_STEPS = 5
BATCH = 16
TINY_DIT = dict(hidden_size=32, depth=2, num_heads=4, time_embed_dim=32,
                in_channels=1, num_classes=11)


def _config():
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  config = train_helpers.make_config(batch_size=BATCH)
  config.data.num_classes = 10
  config.train.p_uncond = 0.1
  return config


def _parts(mesh):
  """(model, optimizer, abstract state, rng, config) of the run on `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import builders, train_step  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import DiT, dit_config  # pylint: disable=g-import-not-at-top
  config = _config()
  model = DiT(config=dit_config("dit_s_2", **TINY_DIT))
  tx = builders.build_optimizer(config)
  abstract = train_step.abstract_train_state(model, tx, image_shape=(8, 8, 1),
                                             mesh=mesh, num_classes=10)
  return model, tx, abstract, jax.random.PRNGKey(config.seed), config


def _train(mesh, images, labels):
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import builders, train_step  # pylint: disable=g-import-not-at-top
  from ddpm_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  model, tx, abstract, rng, config = _parts(mesh)
  state = train_step.create_train_state(model, tx, rng, image_shape=(8, 8, 1),
                                        mesh=mesh, num_classes=10)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, abstract)
  data = parallel.data_sharded(mesh)
  losses = []
  for i in range(NUM_STEPS):
    rows = slice(i * BATCH, (i + 1) * BATCH)
    batch = {
        "image": jax.device_put(images[rows], data),
        "label": jax.device_put(labels[rows], data)
    }
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses), rng


def _restored(directory, mesh):
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import checkpoint  # pylint: disable=g-import-not-at-top
  from ddpm_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  _, _, abstract, rng, _ = _parts(mesh)
  with checkpoint.CheckpointManager(directory, writable=False) as ckpt:
    _, state, _, _ = ckpt.restore_newest_valid(
        abstract,
        jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                             sharding=parallel.replicated(mesh)))
  for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim)
  return state


def main(workdir: str, out: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import checkpoint  # pylint: disable=g-import-not-at-top
  from ddpm_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  images = train_helpers.load_digits()
  labels = (np.arange(len(images)) % 10).astype(np.int32)
  results = {}
  states = {}
  for name, mesh in [("dp", parallel.create_mesh()),
                     ("fsdp8", parallel.create_mesh(fsdp=8)),
                     ("fsdp4", parallel.create_mesh(fsdp=4))]:
    state, losses, rng = _train(mesh, images, labels)
    states[name] = state
    results[f"{name}/losses"] = losses
    for k, v in train_helpers.flat({
        "params": state.params,
        "ema": state.ema_params,
        "opt": state.opt_state
    }).items():
      results[f"{name}/state{k}"] = v
    with checkpoint.CheckpointManager(Path(workdir) / name) as ckpt:
      ckpt.save(NUM_STEPS, state, rng)
      ckpt.wait_until_finished()
  for k, leaf in jax.tree_util.tree_leaves_with_path(states["fsdp8"]):
    results[f"shard{jax.tree_util.keystr(k)}"] = np.array(
        leaf.addressable_shards[0].data.shape)
    results[f"shape{jax.tree_util.keystr(k)}"] = np.array(leaf.shape)
  for name, source, mesh in [
      ("one", "fsdp8", parallel.create_mesh(jax.devices()[:1])),
      ("four_by_two", "fsdp8", parallel.create_mesh(fsdp=2)),
      ("dp_to_fsdp8", "dp", parallel.create_mesh(fsdp=8)),
  ]:
    state = _restored(Path(workdir) / source, mesh)
    for k, v in train_helpers.flat(state.params).items():
      results[f"restored_{name}{k}"] = v
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
