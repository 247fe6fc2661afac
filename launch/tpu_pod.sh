#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice, with the run on Cloud
# Storage (what is on a TPU VM's own disk dies with it).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh [CONFIG] [extra flags...]
#
# The same command on every worker (--worker=all); jax.distributed finds the
# other workers by itself (TPU_WORKER_HOSTNAMES). Process 0 logs and writes
# images and results; all workers write the checkpoints together.
#
# Preemption (spot/preemptible TPUs, maintenance): the VMs get SIGTERM; the
# trainer finishes the step, writes a checkpoint to the bucket, waits for it
# and exits 0. Recreate the TPU (same name) and run this script again: it
# resumes from the newest complete checkpoint in $BUCKET/runs/$RUN. A
# checkpoint cut short by the preemption is skipped. Sampling and evaluation
# (--mode=sample / --mode=eval) take the same command.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG="${1:-configs/cifar10.py}"
shift || true
RUN="${RUN:-$(basename "${CONFIG%%.py*}")}"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

# This checkout (its committed state) and JAX for TPUs on every worker.
cd "$(dirname "$0")/.."
ARCHIVE="$(mktemp -d)/ddpm_jax.tar.gz"
git archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME": --zone="$ZONE" \
  --worker=all
on_all_workers "mkdir -p ddpm_jax && tar -xzf ddpm_jax.tar.gz -C ddpm_jax \
  && pip install -q -e './ddpm_jax[tf]' 'jax[tpu]'"

# The run itself (again after a preemption: it resumes). The log of each
# worker goes to ~/ddpm_jax/train.log on that worker.
on_all_workers "cd ddpm_jax && python -m ddpm_jax.main --config=$CONFIG \
  --workdir=$BUCKET/runs/$RUN $* 2>&1 | tee train.log"
