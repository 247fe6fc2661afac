#!/usr/bin/env bash
# The GPU check of issue 19, prepared to run once on one H200 within 8 minutes,
# machine start-up included: the numerics tests that matter on GPU (kernels:
# cuDNN attention against the closed form, bf16 against f32; the U-Net), then
# benchmarks/gpu_check.py (ddpm_cifar10 train steps at batch 128/256/512 in
# bf16 and f32, DDIM-50 at a large batch, DiT-B/2's bf16 train step and model
# FLOP utilisation, compile times, the cuDNN/XLA attention A/B, a profile
# summary). Writes OUT_DIR/pytest.log,
# OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # CPU, tiny sizes (CI runs this)
#
# The GPU image has jax with CUDA, flax, optax, orbax-checkpoint, chex, absl-py
# and PyYAML but no ml_collections (and no TensorFlow, which this check does not
# use). Put its wheel in .whl/ beforehand, where pip can reach the registry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0
# and carry .whl with the run; this script installs every wheel found there.
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
  timeout 150 python3 -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/pytest.log" 2>&1 \
    || echo "gpu_check: numerics tests failed or timed out, see $out/pytest.log" >&2
  tail -n 30 "$out/pytest.log"
  timeout 330 python3 -m benchmarks.gpu_check --out "$out" --pytest-log "$out/pytest.log" \
    --budget-s 270
fi
