r"""Command line of ddpm_jax: train, sample and evaluate diffusion models.

  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits \
    --mode=sample --config.sample.num_images=256
  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/digits \
    --mode=eval

Any config field can be overridden with --config.GROUP.FIELD=VALUE. The
installed console script `ddpm-jax` takes the same flags. A bad command line
exits with status 2; a bad config, bad data, a workdir without a usable
checkpoint (for sample and eval), checkpoints of another network, unusable
FID Inception weights, a failed checkpoint write (a full disk) or, on several
hosts, a lost host give one line on stderr and exit status 1.

Training records its config in `<workdir>/config.json` (when the workdir has
none yet); checkpoints of another network are reported with the fields of
model, data and optimizer that differ from it.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax.data import pipeline
from ddpm_jax.engine import (
    builders,
    checkpoint,
    evaluation,
    generation,
    inference,
    train,
)
from ddpm_jax.engine import config as config_lib
from ddpm_jax.engine import workdir as workdir_lib
from ddpm_jax.infra import cpu_flags, hugepages, parallel, storage
from ddpm_jax.metrics import inception

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10.py or "
    "configs/cifar10.py:tiny; override fields with --config.GROUP.FIELD=V.",
    lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard logs, samples "
    "and evaluation results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", list(config_lib.MODES),
    "train (resumes from the workdir's latest "
    "checkpoint), sample or eval.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: reported in one line, without traceback.
USER_ERRORS = (config_lib.ConfigError, pipeline.DataError, train.NonFiniteError,
               checkpoint.CheckpointError, storage.StorageError,
               inception.WeightsError, FileNotFoundError)


def check_same_run(config, *, workdir: str, mode: str) -> None:
  """Every host must run the same config, workdir and mode: they are hashed
  on each and compared (a collective; nothing on one host).

  Raises:
    ConfigError: naming the hosts that differ from process 0.
  """
  run = json.dumps(
      {
          "config": config.to_dict(),
          "workdir": workdir,
          "mode": mode
      }, sort_keys=True, default=repr)
  differ = parallel.differing_processes(run)
  if differ:
    raise config_lib.ConfigError(
        f"Hosts started with different configs: {', '.join(differ)} "
        f"differ from process 0 (the config, its overrides, --workdir or "
        f"--mode); start every host with the same command.")


def check_config_and_workdir(config, *, workdir: str, mode: str) -> None:
  """Validates the config and the workdir on every host; when either fails
  on any host, every host stops naming the hosts that failed and why.

  Raises:
    One of USER_ERRORS: on one process, the failed check's own error; on
      several, a ConfigError with each failing host's message.
  """
  error = None
  try:
    config_lib.validate_config(config, mode=mode,
                               num_devices=jax.device_count(),
                               process_count=jax.process_count())
    workdir_lib.check_workdir(workdir, mode=mode)
  except USER_ERRORS as e:
    if jax.process_count() == 1:
      raise
    error = str(e)
  if jax.process_count() > 1:
    failed = parallel.failed_processes(error)
    if failed:
      raise config_lib.ConfigError(
          f"Start-up checks failed on {'; '.join(failed)}")


_TRACEBACK = "Traceback (most recent call last):"
_LIBRARIES = ("/orbax/", "/jax/_src/")


def _raised_in_a_library(exc_info) -> bool:
  return bool(exc_info) and exc_info[2] is not None and any(
      part in frame.filename
      for frame in traceback.extract_tb(exc_info[2])
      for part in _LIBRARIES)


def quiet_libraries(record) -> bool:
  """Drops Orbax's and JAX's INFO chatter from the log; keeps their warnings
  and errors, without tracebacks (a failure they log is also raised, and
  reported in one line), also those formatted into the message itself.

  asyncio's "Task exception was never retrieved" for a task that failed
  inside Orbax or JAX is dropped: after the first failed write of a
  checkpoint, Orbax's other write tasks of that step fail too (the
  unfinished step is removed); the first failure is the one reported.
  """
  if record.name == "asyncio" and _raised_in_a_library(record.exc_info):
    return False
  if not any(part in record.pathname for part in _LIBRARIES):
    return True
  record.exc_info, record.exc_text = None, None
  message = record.getMessage()
  if _TRACEBACK in message:
    record.msg, record.args = message.split(_TRACEBACK)[0].rstrip(), ()
  return record.levelno >= std_logging.WARNING


def _report(message: str) -> None:
  logging.error("%s", message)
  print(f"ddpm_jax: error: {message}", file=sys.stderr, flush=True)


def _stop_on_lost_host(message: str) -> None:
  """A lost host: one line, then exit at once (the main thread may be
  waiting in a collective that never returns)."""
  _report(message)
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access


def explain_mismatch(error: checkpoint.CheckpointMismatch, config, *,
                     workdir: str) -> str:
  """The mismatch's message with the config fields that differ from the
  run's recorded config (`<workdir>/config.json`), when it has one.

  Example:
    >>> explain_mismatch(error, config, workdir="/tmp/ddpm_digits")
    "The checkpoints in ... The workdir's run was trained with another
    config: model.base_channels: 8 in the run, 16 now."
  """
  differ = workdir_lib.config_differences(workdir, config)
  if not differ:
    return str(error)
  return (f"{error} The workdir's run was trained with another config: "
          f"{'; '.join(differ)}.")


def main(argv) -> None:
  """Trains, samples or evaluates the run of --config in --workdir (--mode)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  parallel.quiet_backend_probe()
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  on_cpu = not hugepages.accelerator_installed()
  if mode == "train" and on_cpu:
    hugepages.reexec_with_huge_page_malloc()  # Returns only if it cannot.
  logging.get_absl_handler().python_handler.addFilter(quiet_libraries)
  if hugepages.huge_page_malloc_active():
    logging.info(
        "malloc uses huge pages (%s): about 1.2x faster CPU train "
        "steps, see ddpm_jax/infra/hugepages.py.", hugepages.MALLOC_TUNABLE)
  if on_cpu and cpu_flags.add_to_environment():
    logging.info(
        "XLA_FLAGS=%s: XLA's own convolutions instead of YNNPACK's, "
        "see ddpm_jax/infra/cpu_flags.py.", os.environ["XLA_FLAGS"])
  watch = None
  try:
    if parallel.initialize_distributed():
      watch = parallel.HostWatch(on_lost=_stop_on_lost_host)
    check_same_run(config, workdir=workdir, mode=mode)
    check_config_and_workdir(config, workdir=workdir, mode=mode)
    run = builders.build_run(config)  # The one reading of the config.
    if mode == "train":
      if jax.process_index() == 0 and not storage.exists(
          os.path.join(workdir, "checkpoints"), directory=True):
        workdir_lib.record_config(workdir, config)
      train.train(run, workdir)
    elif mode == "sample":
      generation.sample_to_files(inference.restore_trained(run, workdir),
                                 run.sampling, seed=run.seed, workdir=workdir)
    else:
      evaluation.evaluate_run(run, workdir)
  except USER_ERRORS as e:
    if watch is not None:
      watch.stop(error=True)
    message = str(e)
    if isinstance(e, checkpoint.CheckpointMismatch):
      message = explain_mismatch(e, config, workdir=workdir)
    _report(message)
    sys.exit(1)
  except Exception:
    # A collective fails too when its peer was killed: let the watch name
    # the lost host (it exits) rather than print this traceback.
    if watch is not None:
      watch.wait_for_loss(2 * parallel.PING_SECONDS)
    raise
  if watch is not None:
    watch.stop()


def _last_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad override or config file in one
  line, not a traceback (e.g. --config.no_such_group.x=1)."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises here.
  except Exception as e:  # pylint: disable=broad-except
    # Config files are user code and may raise anything; the last line of
    # the message says what went wrong.
    print(
        f"ddpm_jax: bad command line: {_last_line(e)}\nPass --helpfull for "
        "the flags.", file=sys.stderr)
    sys.exit(2)
  return argv


def run() -> None:
  """Entry point of `python -m ddpm_jax.main` and the `ddpm-jax` script."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
