"""Seeded random fault-injection campaign (issue 9), run on its own:

  python tests/fault_injection.py [--seed 0] [--kills 12] [--corruptions 6]
                                  [--bad-inputs 60] [--disk-full 3]
                                  [--lost-hosts 1]

Not part of `python -m pytest` (a few minutes on two CPU cores). It

* trains real subprocesses (tests/fault_helpers.py) in a few workdirs and
  interrupts each several times at random moments that the child announces
  and waits at: SIGKILL during start-up (three points), mid-step (a random
  step) or mid-save (a random checkpoint, its tmp directory just created,
  half moved into place, or complete but not committed), or SIGTERM mid-step;
* between runs damages the newest complete checkpoint in a random way
  (fault_helpers.CORRUPTIONS);
* checks every restart resumed from the newest complete, undamaged
  checkpoint (nothing lost beyond the steps after it; a damaged one reported
  with its path), and that each workdir's final parameters, EMA, optimizer
  state and rng equal an uninterrupted run's bit for bit;
* feeds random bad data (npz files, image folders), out-of-range config
  values, unusable FID Inception weights and a tfds: source without
  TensorFlow to the input pipeline, the config checks and the weight loader:
  each must give a DataError / ConfigError / WeightsError naming the file or
  field, never another exception;
* fills the disk (every write into checkpoint K fails with ENOSPC) in child
  runs at a random checkpoint: each must stop with one line naming the last
  good checkpoint, leave nothing unfinished, and a restart must end bit for
  bit as the uninterrupted run;
* kills (SIGKILL) one of two hosts of a command-line run (two processes,
  jax.distributed over gloo) once a checkpoint is complete: the other must
  stop with one line naming the lost process (the seconds it took are
  printed).

It prints how many of each were tried and exits 1 if anything was lost or
unclear. docs/robustness.md records a run's counts.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_helpers as fh  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS = 10
MOMENTS = ("start-up", "mid-step", "mid-save", "sigterm")
# Known noise: after a read of a damaged OCDBT manifest fails, TensorStore
# callbacks print "Event loop is closed" tracebacks from its own threads (the
# restore itself is handled; counted apart).
NOISE = ("Traceback (most recent call last):", "asyncio/base_events.py",
         "self._check_closed()", "raise RuntimeError('Event loop is closed')",
         "RuntimeError: Event loop is closed")


def choose_hold(rng: random.Random, moment: str, newest: int,
                has_checkpoint: bool) -> tuple[str, bool]:
  """A hold of kind `moment` that a run resuming at or before step `newest`
  reaches; returns (hold, send SIGTERM instead of SIGKILL)."""
  if moment != "start-up" and newest >= NUM_STEPS:
    moment = "start-up"  # nothing left to train: only start-up remains
  if moment == "start-up":
    return rng.choice(["start-up:begin", "start-up:dataset"] +
                      (["start-up:restored"] if has_checkpoint else [])), False
  if moment in ("mid-step", "sigterm"):
    return f"mid-step:{rng.randint(newest + 1, NUM_STEPS)}", moment == "sigterm"
  saves = [
      k for k in range(newest + 1, NUM_STEPS + 1)
      if k % fh.CHECKPOINT_EVERY == 0 or k == NUM_STEPS
  ]
  where = rng.choice(["begin", "items", "commit"])
  return f"mid-save:{rng.choice(saves)}:{where}", False


def kill_campaign(base: Path, cache: str, rng: random.Random, kills: int,
                  corruptions: int, failures: list[str]) -> dict:
  stats = collections.Counter()
  fh.run_to_end(base / "reference", NUM_STEPS, "reference", cache_dir=cache)
  reference = fh.read_checkpoint(base / "reference", NUM_STEPS)
  per_workdir = 4
  workdirs = max(1, -(-kills // per_workdir))
  corrupt_left = corruptions
  done = 0
  for w in range(workdirs):
    workdir = base / f"run{w}"
    expected_from = None  # the step the next run must resume from
    damaged = None
    for i in range(min(per_workdir, kills - done)):
      complete = fh.complete_steps(workdir)
      hold, sigterm = choose_hold(rng, rng.choice(MOMENTS),
                                  complete[-1] if complete else 0,
                                  bool(complete))
      r = fh.interrupt(workdir, NUM_STEPS, f"run{w}-{i}", hold, sigterm=sigterm,
                       cache_dir=cache)
      done += 1
      moment = ("sigterm" if sigterm else hold.split(":")[0])
      stats[f"kill:{moment}"] += 1
      where = f"run{w}/{i} ({hold}{', SIGTERM' if sigterm else ''})"
      if r.at is None:
        failures.append(f"{where}: exited ({r.exit_code}) before its hold:\n"
                        f"{r.log[-2000:]}")
        continue
      log = r.log
      if "RuntimeError: Event loop is closed" in log:
        log = "\n".join(
            l for l in log.splitlines() if not any(n in l for n in NOISE))
        stats["noise:event-loop-closed"] += 1
      if "Traceback" in log:
        at = log.index("Traceback")
        failures.append(f"{where}: traceback in the log:\n"
                        f"{log[max(0, at - 500):at + 2500]}")
      if r.exit_code != (0 if sigterm else -signal.SIGKILL):
        failures.append(f"{where}: exit code {r.exit_code}")
      if hold.startswith("mid-save"):
        step = int(hold.split(":")[1])
        if not any(
            t.startswith(f"{step}{fh.TMP_MARKER}")
            for t in fh.tmp_dirs(workdir)):
          failures.append(f"{where}: no tmp directory of step {step} after "
                          "the kill")
      got = (r.at.get("restored_step") if hold == "start-up:restored" else
             r.resumed_from if hold.startswith("mid-") else "-")
      if got != "-" and expected_from is not None and got != expected_from:
        failures.append(f"{where}: resumed from {got}, expected "
                        f"{expected_from}")
      if damaged is not None:
        step, kind, changed = damaged
        reported = (f"Checkpoint {fh.checkpoint_dir(workdir) / str(step)} is "
                    "unusable" in r.log or f"Removing {changed}" in r.log)
        if reported:
          stats["corruption:detected"] += 1
          damaged = None
        elif got != "-":  # it restored, yet said nothing of the damage
          if kind == "truncate-any-file" and got == step:
            stats["corruption:harmless"] += 1  # never read; arrays verified
          else:
            failures.append(f"{where}: damaged step {step} ({kind}) was not "
                            "reported")
          damaged = None
      if damaged is None:
        complete = fh.complete_steps(workdir)
        expected_from = complete[-1] if complete else None
        if corrupt_left and len(complete) >= 2 and rng.random() < 0.8:
          kind = rng.choice(fh.CORRUPTIONS)
          changed = fh.corrupt(workdir, complete[-1], kind, rng)
          stats[f"corruption:{kind}"] += 1
          corrupt_left -= 1
          damaged = (complete[-1], kind, changed)
          expected_from = complete[-2]
          if kind == "truncate-any-file":
            expected_from = None  # the damaged file may not be read at all
    log = fh.run_to_end(workdir, NUM_STEPS, f"run{w}-final", cache_dir=cache)
    if expected_from is not None and fh.resumed_from(log) != expected_from:
      failures.append(f"run{w}/final: resumed from {fh.resumed_from(log)}, "
                      f"expected {expected_from}")
    try:
      fh.assert_same_arrays(fh.read_checkpoint(workdir, NUM_STEPS), reference)
      stats["workdir:identical"] += 1
    except AssertionError as e:
      failures.append(f"run{w}: final state differs from the uninterrupted "
                      f"run: {e}")
    stats["workdirs"] += 1
  return stats


# ---------------------------------------------------------------------------
# Bad input.


def _bad_npz(path: Path, rng: random.Random) -> tuple[str, str]:
  """Writes a random bad npz; returns (what, source)."""
  n, s = rng.randint(4, 12), rng.choice([6, 8])
  x = np.random.default_rng(rng.randrange(2**31)).integers(
      0, 256, (n, s, s), dtype=np.uint8)
  y = np.arange(n) % 3
  kind = rng.choice([
      "missing-x", "missing-y", "float-out-of-range", "int-out-of-range", "nan",
      "complex", "ndim", "channels-2", "empty", "negative-label", "float-label",
      "label-count", "truncated", "garbage", "single-array"
  ])
  arrays = dict(x_train=x, y_train=y)
  if kind == "missing-x":
    arrays.pop("x_train")
  elif kind == "missing-y":
    arrays.pop("y_train")
  elif kind == "float-out-of-range":
    arrays["x_train"] = x.astype(np.float32) * rng.choice([2.0, -1.0])
  elif kind == "int-out-of-range":
    arrays["x_train"] = x.astype(np.int32) + rng.choice([256, -300])
  elif kind == "nan":
    arrays["x_train"] = np.where(x > 128, np.nan, x / 255).astype(np.float32)
  elif kind == "complex":
    arrays["x_train"] = x.astype(np.complex64)
  elif kind == "ndim":
    arrays["x_train"] = x.reshape(n, -1)
  elif kind == "channels-2":
    arrays["x_train"] = np.stack([x, x], axis=-1)
  elif kind == "empty":
    arrays = dict(x_train=x[:0], y_train=y[:0])
  elif kind == "negative-label":
    arrays["y_train"] = y - 1
  elif kind == "float-label":
    arrays["y_train"] = y.astype(np.float32)
  elif kind == "label-count":
    arrays["y_train"] = y[:-1]
  if kind == "single-array":
    with open(path, "wb") as f:
      np.save(f, x)
  else:
    np.savez(path, **arrays)
  if kind == "truncated":
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(1, len(data))])
  elif kind == "garbage":
    path.write_bytes(bytes(rng.randrange(256) for _ in range(200)))
  return f"npz:{kind}", f"npz:{path}"


def _bad_folder(root: Path, rng: random.Random) -> tuple[str, str, str]:
  """A folder of PNGs with one random bad file; returns (what, source,
  name of the bad file)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c in ("cat", "dog"):
    (root / "train" / c).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((8, 8, 3), 40 * i,
                              np.uint8)).save(root / "train" / c / f"{i}.png")
  kind = rng.choice(["text", "truncated-png", "wrong-size", "loose-file"])
  if kind == "text":
    bad = root / "train" / "cat" / "notes.txt"
    bad.write_text("not an image")
  elif kind == "truncated-png":
    # Cut inside the pixel data (a PNG cut only in its trailing IEND chunk
    # still decodes to the right pixels, and is rightly accepted).
    bad = root / "train" / "dog" / "cut.png"
    noise = np.random.default_rng(rng.randrange(2**31)).integers(
        0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[:rng.randrange(8, len(data) // 2)])
  elif kind == "wrong-size":
    bad = root / "train" / "dog" / "big.png"
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(bad)
  else:
    bad = root / "train" / "README"
    bad.write_text("hello")
  return f"folder:{kind}", f"folder:{root}", bad.name


_BAD_CONFIG = [
    ("optimizer.lr", [-1e-4, float("nan"), float("inf")]),
    ("train.ema_decay", [1.0, -0.1, 1.5]),
    ("diffusion.num_timesteps", [0, -5]),
    ("sample.eta", [-0.1, 1.01, 2.0]),
    ("sample.num_steps", [0, 10**6]),
    ("train.batch_size", [0, 9]),  # 9 over 2 devices
    ("diffusion.beta_end", [0.0, 1.0]),
    ("train.num_steps", [0]),
    ("train.max_nonfinite_steps", [-1]),
    ("train.checkpoint_every", [0]),
]


def _bad_weights(path: Path, rng: random.Random) -> str:
  """Writes unusable FID Inception weights; returns the kind."""
  kind = rng.choice(
      ["garbage", "truncated", "wrong-keys", "wrong-shape", "other-format"])
  if kind == "garbage":
    path.write_bytes(bytes(rng.randrange(256) for _ in range(300)))
  elif kind == "wrong-keys":
    np.savez(path, x_train=np.zeros((2, 4)), y_train=np.zeros(2))
  else:
    import inception_helpers as ih  # pylint: disable=g-import-not-at-top
    state = ih.random_state_dict(ih.torch_layout(ih.flax_shapes()))
    if kind == "wrong-shape":
      name = rng.choice(sorted(state))
      state[name] = np.zeros(state[name].shape + (2,), np.float32)
    np.savez(path, **state)
    if kind == "truncated":
      data = path.read_bytes()
      path.write_bytes(data[:rng.randrange(1, len(data) // 2)])
    elif kind == "other-format":
      path.rename(path.with_suffix(".h5"))
  return kind


def bad_input_campaign(base: Path, rng: random.Random, count: int,
                       failures: list[str]) -> dict:
  from ddpm_jax.data import pipeline as ip  # pylint: disable=g-import-not-at-top
  from ddpm_jax.engine import config as config_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.engine.config import base_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  stats = collections.Counter()
  for i in range(count):
    what = rng.choice(
        ["npz", "folder", "folder-skip", "config", "weights", "tfds"])
    if what == "weights":
      path = base / f"weights{i}.npz"
      kind = _bad_weights(path, rng)
      if kind == "other-format":
        path = path.with_suffix(".h5")
      label = f"weights:{kind}"
      stats[label] += 1
      try:
        inception.load_fid_inception_params(path)
        failures.append(f"{label}: accepted")
      except inception.WeightsError as e:
        if path.name not in str(e):
          failures.append(f"{label}: message does not name {path.name}: {e}")
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{label}: {type(e).__name__} instead of "
                        f"WeightsError: {e}")
      continue
    if what == "tfds":
      label = "tfds:no-tensorflow"
      stats[label] += 1
      saved = sys.modules.get("tensorflow")
      sys.modules["tensorflow"] = None  # its import fails
      try:
        ip.create_dataset("tfds:mnist", batch_size=2, image_size=None,
                          channels=None, random_flip=False, seed=0)
        failures.append(f"{label}: accepted")
      except ip.DataError as e:
        if 'pip install -e ".[tf]"' not in str(e):
          failures.append(f"{label}: message names no extra: {e}")
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{label}: {type(e).__name__} instead of DataError:"
                        f" {e}")
      finally:
        if saved is None:
          del sys.modules["tensorflow"]
        else:
          sys.modules["tensorflow"] = saved
      continue
    if what == "config":
      field, values = rng.choice(_BAD_CONFIG)
      value = rng.choice(values)
      config = base_config()
      config.sample.sampler = "ddim"
      group, name = field.split(".")
      config[group][name] = value
      label = f"config:{field}={value}"
      try:
        config_lib.validate_config(config, mode="train", num_devices=2,
                                   process_count=1)
        failures.append(f"{label}: accepted")
      except config_lib.ConfigError as e:
        if f"config.{group}." not in str(e) and "config." not in str(e):
          failures.append(f"{label}: message names no field: {e}")
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{label}: {type(e).__name__} instead of ConfigError:"
                        f" {e}")
      stats[label.split("=")[0]] += 1
      continue
    case = base / f"input{i}"
    case.mkdir()
    skip = False
    if what == "npz":
      label, source = _bad_npz(case / "data.npz", rng)
      must_name = "data.npz"
    else:
      label, source, must_name = _bad_folder(case / "data", rng)
      skip = what == "folder-skip" and "wrong-size" not in label
      label += " (skip_bad_files)" if skip else ""
    stats[label] += 1
    try:
      batch = next(
          ip.create_dataset(source, batch_size=2, image_size=None,
                            channels=None, random_flip=False, seed=0,
                            skip_bad_files=skip))
      if not skip:
        failures.append(f"{label}: accepted")
      elif not np.all(np.isfinite(batch["image"])):
        failures.append(f"{label}: non-finite images after skipping")
    except ip.DataError as e:
      if skip:
        failures.append(f"{label}: not skipped: {e}")
      elif must_name not in str(e):
        failures.append(f"{label}: message does not name {must_name}: {e}")
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{label}: {type(e).__name__} instead of DataError: "
                      f"{e}")
  return stats


def disk_full_campaign(base: Path, cache: str, rng: random.Random, count: int,
                       reference: dict, failures: list[str]) -> dict:
  """Child runs whose checkpoint K cannot be written (a full disk)."""
  stats = collections.Counter()
  saves = [
      k for k in range(1, NUM_STEPS + 1)
      if k % fh.CHECKPOINT_EVERY == 0 or k == NUM_STEPS
  ]
  for i in range(count):
    step = rng.choice(saves)
    stats[f"disk-full:step {step}"] += 1
    workdir = base / f"full{i}"
    where = f"disk-full {i} (checkpoint {step})"
    with fh.Child(workdir, NUM_STEPS, f"full{i}", hold=f"disk-full:{step}",
                  cache_dir=cache) as child:
      rc = child.wait()
      log = child.log()
    lines = [l for l in log.splitlines() if l.startswith("ddpm_jax:")]
    before = [k for k in saves if k < step][-fh.KEEP_CHECKPOINTS:]
    good = (
        f"step {before[-1]} in {fh.checkpoint_dir(workdir) / str(before[-1])}"
        if before else "none")
    if rc != 1 or "Traceback" in log or len(lines) != 1:
      failures.append(f"{where}: exit {rc}, {len(lines)} error lines:\n"
                      f"{log[-2000:]}")
    elif (f"Could not write checkpoint step {step}" not in lines[0] or
          f"Last good checkpoint: {good}" not in lines[0]):
      failures.append(f"{where}: unclear line: {lines[0]}")
    # At most a tmp directory of step K (a write still in flight may
    # recreate it), which the restart must remove.
    left = fh.tmp_dirs(workdir)
    stats["disk-full:tmp left for the restart"] += bool(left)
    if (any(not t.startswith(f"{step}{fh.TMP_MARKER}") for t in left) or
        fh.complete_steps(workdir) != before):
      failures.append(f"{where}: left {left}, complete "
                      f"{fh.complete_steps(workdir)}")
    log = fh.run_to_end(workdir, NUM_STEPS, f"full{i}-final", cache_dir=cache)
    if fh.resumed_from(log) != (before[-1] if before else None):
      failures.append(f"{where}: resumed from {fh.resumed_from(log)}")
    if fh.tmp_dirs(workdir) or any(
        f"Removing {fh.checkpoint_dir(workdir) / t}" not in log for t in left):
      failures.append(f"{where}: the restart did not remove {left}")
    try:
      fh.assert_same_arrays(fh.read_checkpoint(workdir, NUM_STEPS), reference)
      stats["disk-full:identical"] += 1
    except AssertionError as e:
      failures.append(f"{where}: final state differs: {e}")
  return stats


def lost_host_campaign(base: Path, rng: random.Random, count: int,
                       failures: list[str]) -> dict:
  """Two-host command-line runs; one host killed once a checkpoint exists."""
  import host_helpers as hh  # pylint: disable=g-import-not-at-top
  stats = collections.Counter()
  for i in range(count):
    victim = rng.choice([0, 1])
    stats[f"lost-host:process {victim}"] += 1
    run = base / f"hosts{i}"
    run.mkdir()
    code, log, seconds, _ = hh.kill_one_host(run, victim)
    lines = [l for l in log.splitlines() if l.startswith("ddpm_jax:")]
    stats["lost-host:seconds"] = max(stats["lost-host:seconds"], seconds)
    ok = code != 0 and len(lines) == 1 and (f"Lost process {victim} ("
                                            in lines[0])
    stats["lost-host:one-line" if ok else "lost-host:other-exit"] += 1
    if not ok:
      failures.append(f"lost host {i} (process {victim} killed): exit {code}"
                      f" after {seconds:.0f} s:\n{log[-2000:]}")
  return stats


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kills", type=int, default=12)
  parser.add_argument("--corruptions", type=int, default=6)
  parser.add_argument("--bad-inputs", type=int, default=60)
  parser.add_argument("--disk-full", type=int, default=3)
  parser.add_argument("--lost-hosts", type=int, default=1)
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  failures: list[str] = []
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="ddpm_faults_") as tmp:
    base = Path(tmp)
    kill_stats = kill_campaign(base, str(base / "jax_cache"), rng, args.kills,
                               args.corruptions, failures)
    (base / "inputs").mkdir()
    input_stats = bad_input_campaign(base / "inputs", rng, args.bad_inputs,
                                     failures)
    disk_stats = disk_full_campaign(
        base, str(base / "jax_cache"), rng, args.disk_full,
        fh.read_checkpoint(base / "reference", NUM_STEPS), failures)
    host_stats = lost_host_campaign(base, rng, args.lost_hosts, failures)

  def part(prefix):
    items = sorted((k[len(prefix):], v)
                   for k, v in kill_stats.items()
                   if k.startswith(prefix))
    return ", ".join(f"{k} {v}" for k, v in items)

  kills = sum(v for k, v in kill_stats.items() if k.startswith("kill:"))
  corrupted = sum(
      v for k, v in kill_stats.items()
      if k.startswith("corruption:") and k not in ("corruption:detected",
                                                   "corruption:harmless"))
  print(f"fault injection, seed {args.seed}, {time.time() - start:.0f} s:")
  print(f"  kills/preemptions tried: {kills} ({part('kill:')})")
  print(
      f"  checkpoint corruptions tried: {corrupted} "
      f"({', '.join(f'{k[11:]} {v}' for k, v in sorted(kill_stats.items()) if k.startswith('corruption:') and k[11:] not in ('detected', 'harmless'))}); "
      f"detected and skipped {kill_stats['corruption:detected']}, "
      f"unread by the restore (arrays verified) "
      f"{kill_stats['corruption:harmless']}")
  print(f"  bad inputs tried: {sum(input_stats.values())} "
        f"({len(input_stats)} kinds)")
  print(f"  bad input kinds: {', '.join(sorted(input_stats))}")
  print(
      f"  disk full: {args.disk_full} ("
      f"{', '.join(f'{k[10:]} {v}' for k, v in sorted(disk_stats.items()) if k.startswith('disk-full:step'))}"
      f"); restarts bit for bit equal: {disk_stats['disk-full:identical']}"
      f" (a tmp directory left for the restart to remove: "
      f"{disk_stats['disk-full:tmp left for the restart']})")
  print(
      f"  lost hosts: {args.lost_hosts} ("
      f"{', '.join(f'{k[10:]} killed {v}' for k, v in sorted(host_stats.items()) if k.startswith('lost-host:process'))}"
      f"); one line from the survivor: {host_stats['lost-host:one-line']}, "
      f"slowest stop {host_stats['lost-host:seconds']:.1f} s after the kill")
  print(f"  workdirs ending bit for bit equal to the uninterrupted run: "
        f"{kill_stats['workdir:identical']}/{kill_stats['workdirs']}")
  if kill_stats["noise:event-loop-closed"]:
    print(f"  runs with TensorStore 'Event loop is closed' noise on stderr "
          f"after a damaged checkpoint was skipped: "
          f"{kill_stats['noise:event-loop-closed']}")
  if failures:
    print(f"FAILED: {len(failures)} problem(s):")
    for f in failures:
      print(f"  - {f}")
    return 1
  print("nothing lost: every restart resumed from the newest complete, "
        "undamaged checkpoint; every bad input gave a clear error.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
