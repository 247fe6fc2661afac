#!/usr/bin/env bash
# The GPU check of issue 29, prepared to run once on one H200 in about 7
# minutes, so that the 15 minutes of device time leave room for the machine's
# start and one rerun: the numerics tests that matter on GPU (kernels: cuDNN
# attention against the closed form, bf16 against f32; the U-Net), then
# benchmarks/gpu_check.py (ddpm_cifar10 train steps at batch 128/256/512 in
# bf16, DDIM-50 and DPM-Solver++(2M)-20 at a large batch, a 1.5-minute
# CIFAR-10 rectified-flow training run with 2,000 samples for an FID,
# DiT-B/2's bf16 train step and model FLOP utilisation, the f32 steps, the
# EDM and flow-matching steps, the cuDNN/XLA attention A/B, a profile
# summary). Writes
# OUT_DIR/pytest.log, OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md and the
# quality run's OUT_DIR/quality_samples.npz and quality_grid.png.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # CPU, tiny sizes (CI runs this)
#
# The GPU image has jax with CUDA, flax, optax, orbax-checkpoint, chex, absl-py
# and PyYAML but no ml_collections (and no TensorFlow, which this check does not
# use), and ../shared does not travel. Beforehand, where pip can reach the
# registry, put the wheel in .whl/ and the CIFAR-10 archive in .data/ (both
# ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0
#   mkdir -p .data && cp ../shared/data/cifar10_jpg.tar.gz .data/
# and carry .whl and .data with the run (about 20 MB); this script installs
# every wheel found in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
if [[ ${1:-} == --dry-run ]]; then dry_run=(--dry-run); shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$out"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

tests=(tests/test_kernels.py tests/test_unet.py)
if (( ${#dry_run[@]} )); then
  # Only collected: the tests themselves run in CI anyway.
  python3 -m pytest -q -p no:cacheprovider --collect-only "${tests[@]}" > "$out/pytest.log"
  python3 -m benchmarks.gpu_check --dry-run --out "$out" --pytest-log "$out/pytest.log"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  # A failing test is reported, not fatal: the figures are still wanted.
  timeout 90 python3 -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/pytest.log" 2>&1 \
    || echo "gpu_check: numerics tests failed or timed out, see $out/pytest.log" >&2
  tail -n 30 "$out/pytest.log"
  timeout 330 python3 -m benchmarks.gpu_check --out "$out" --pytest-log "$out/pytest.log" \
    --budget-s 240
fi
