r"""Command line of ddpm_jax: train, sample and evaluate diffusion models.

  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits \
    --mode=sample --config.sample.num_images=256
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits \
    --mode=eval

Any config field can be overridden with --config.GROUP.FIELD=VALUE. The
installed console script `ddpm-jax` takes the same flags. A bad config, bad
data or a workdir without a checkpoint (for sample and eval) gives one line
on stderr and exit status 1. On Linux the program first restarts itself once
with huge pages for malloc's large blocks (`reexec_with_huge_page_malloc`).
"""

from __future__ import annotations

import logging as std_logging
import os
import platform
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import (checkpoint, config_validation, evaluation, generation,
                      input_pipeline, train)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10.py or "
    "configs/cifar10.py:tiny; override fields with --config.GROUP.FIELD=V.",
    lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard logs, samples "
    "and evaluation results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                          "train (resumes from the workdir's latest "
                          "checkpoint), sample or eval.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: reported in one line, without traceback.
USER_ERRORS = (config_validation.ConfigError, input_pipeline.DataError,
               train.NonFiniteError, checkpoint.CheckpointError,
               FileNotFoundError)


def _restore(config, workdir: str):
  """Model, schedule, mesh, EMA parameters and step of the latest checkpoint."""
  mesh = train.create_mesh()
  model = train.create_model(config)
  params, step = train.restore_ema_params(config, workdir, model=model,
                                          mesh=mesh)
  schedule = train.make_schedule_from_config(config.diffusion)
  return model, schedule, mesh, params, step


def sample(config, workdir: str) -> dict:
  """`--mode=sample`: images from the latest checkpoint's EMA parameters."""
  model, schedule, mesh, params, step = _restore(config, workdir)
  return generation.sample_to_files(model, params, schedule, config,
                                    step=step, workdir=workdir, mesh=mesh)


def evaluate(config, workdir: str) -> dict:
  """`--mode=eval`: bits/dim of the eval split (and FID, IS, KID with the
  Inception weights) for the latest checkpoint's EMA parameters."""
  model, schedule, mesh, params, step = _restore(config, workdir)
  data = config.data
  process_count = jax.process_count()

  def one_pass(split, batch_size):
    return input_pipeline.create_dataset(
        data.source, split=split, batch_size=batch_size // process_count,
        image_size=data.image_size, channels=data.channels,
        resize=data.resize, random_flip=False, seed=config.seed,
        shuffle=False, repeat=False, process_index=jax.process_index(),
        process_count=process_count, skip_bad_files=data.skip_bad_files)

  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  bpd_key, sample_key = jax.random.split(key)
  results = evaluation.bits_per_dim(
      model, params, schedule, config,
      one_pass(data.eval_split, int(config.eval.batch_size)), mesh=mesh,
      num_images=int(config.eval.num_images), key=bpd_key)
  logging.info("Step %d, %d images of split %r: %.4f bits/dim (prior %.3g, "
               "decoder %.4f, KL terms %.4f).", step, results["num_images"],
               data.eval_split, results["total_bpd"], results["prior_bpd"],
               results["decoder_bpd"], results["kl_bpd"])
  if config.eval.inception_weights:
    def reference_images():
      count = int(config.eval.num_reference)
      chunks, total = [], 0
      for batch in one_pass(data.split, int(config.eval.batch_size)):
        chunk = np.asarray(batch["image"])[np.asarray(batch["mask"])]
        chunks.append(np.round((chunk + 1.0) * 127.5).astype(np.uint8))
        total += len(chunk)
        if total >= count:
          break
      return np.concatenate(chunks)[:count]
    results.update(evaluation.sample_quality(
        model, params, schedule, config, mesh=mesh,
        reference_images=reference_images, key=sample_key, workdir=workdir))
    logging.info("FID %.3f, Inception Score %.3f +- %.3f, KID %.5f +- %.5f "
                 "(%d samples).", results["fid"], results["inception_score"],
                 results["inception_score_std"], results["kid"],
                 results["kid_std"], results["num_samples"])
  else:
    logging.warning(
        "FID, Inception Score and KID skipped: no Inception weights. Set "
        "--config.eval.inception_weights=PATH to pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (or its .npz conversion, see "
        "ddpm_jax.models.inception).")
  path = evaluation.write_results(dict(results, step=step), workdir, step)
  logging.info("Wrote %s.", path)
  return results


def _quiet_libraries(record) -> bool:
  """Drops Orbax's and JAX's INFO chatter from the log; keeps warnings."""
  return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  try:
    train.initialize_distributed()
    config_validation.validate_config(config, mode=mode,
                                      num_devices=jax.device_count(),
                                      process_count=jax.process_count())
    config_validation.check_workdir(workdir, mode=mode)
    if mode == "train":
      train.train_and_evaluate(config, workdir)
    elif mode == "sample":
      sample(config, workdir)
    else:
      evaluate(config, workdir)
  except USER_ERRORS as e:
    logging.error("%s", e)
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad override in one line, not a
  traceback (e.g. --config.no_such_group.x=1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"ddpm_jax: bad command line: {e}\nPass --helpfull for the flags.",
          file=sys.stderr)
    sys.exit(2)


# glibc tunable: back malloc's mmap'd blocks with transparent huge pages.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_malloc_supported() -> bool:
  """Whether glibc >= 2.35 runs this process and the kernel's transparent huge pages are on."""
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def reexec_with_huge_page_malloc() -> None:
  """Restarts this program once with glibc's malloc using transparent huge pages.

  XLA:CPU allocates each step's temporaries afresh (gigabytes for a U-Net at
  batch 128) and frees them after the step; glibc serves such blocks with
  mmap, so every step faults its whole working set in again, 4 KiB at a
  time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) those
  blocks get 2 MiB pages: on a 2-core machine the tutorial net's step at
  batch 128 goes from about 1.1 million page faults and 3-4 s of system
  time to about 4,000 faults and 1.5 s, 1.2x faster (BENCHMARKS.md).
  Tunables are read only at start-up, hence the re-exec (same pid, same
  arguments) before anything runs. Does nothing when GLIBC_TUNABLES already
  sets `glibc.malloc.hugetlb` (set it to 0 to opt out), off glibc, on older
  glibc, or when the kernel's transparent huge pages are disabled. Call it
  only from a program's entry point: it replaces the running process.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or not huge_page_malloc_supported():
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, MALLOC_TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)


def run() -> None:
  """Entry point of `python -m ddpm_jax.main` and the `ddpm-jax` script."""
  reexec_with_huge_page_malloc()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
