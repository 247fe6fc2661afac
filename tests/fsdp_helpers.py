"""The FSDP checks of tests/test_fsdp.py, run as subprocess workers.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/fsdp_helpers.py devices8 WORKDIR OUT.npz
  python tests/fsdp_helpers.py distributed PROCESS_ID PORT WORKDIR OUT.npz
      one of two processes of a jax.distributed run on localhost (gloo):
      `train_and_evaluate` of `distributed_config()` with the state sharded
      over both processes; OUT.npz gets the final step and the parameters.

devices8: a tiny class-conditional DiT trains 5 steps on the same batches
three ways:
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


def distributed_config(fsdp: int):
  """The tiny DiT in the run config: 6 steps of batch 8, checkpoints at 2,
  4 and 6 (2 kept), sharded over `fsdp` devices."""
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  config = train_helpers.make_config()
  config.model = dict(preset="dit_s_2", hidden_size=32, depth=2, num_heads=4,
                      time_embed_dim=32, in_channels=1)
  config.train.fsdp = fsdp
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


def distributed(process_id: int, port: str, workdir: str, out: str) -> None:
  from ddpm_jax.engine import train  # pylint: disable=g-import-not-at-top
  from ddpm_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from tests import train_helpers  # pylint: disable=g-import-not-at-top
  assert parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 2
  state = train.train_and_evaluate(
      distributed_config(2), workdir,
      dataset_factory=train_helpers.dataset_factory(
          train_helpers.load_digits()))
  shards = {
      jax.tree_util.keystr(k): v.addressable_shards[0].data.shape
      for k, v in jax.tree_util.tree_leaves_with_path(state.params)
  }
  params = multihost_utils.process_allgather(state.params, tiled=True)
  np.savez(out, step=np.asarray(state.step.addressable_data(0)), **{
      "params" + k: v for k, v in train_helpers.flat(params).items()
  }, **{
      "shard" + k: np.array(v) for k, v in shards.items()
  })


if __name__ == "__main__":
  if sys.argv[1] == "devices8":
    main(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "distributed":
    distributed(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]}")
