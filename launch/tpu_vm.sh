#!/usr/bin/env bash
# One training run on every worker of a Cloud TPU VM slice (v4-32, v5p-64, v6e-16, ...): copies
# this checkout to each worker, installs it with jax[tpu], then starts the same command on all of
# them. jax.distributed.initialize() finds the peers from the TPU metadata: no extra flags.
#
#   TPU=my-v5p-32 ZONE=us-east5-a launch/tpu_vm.sh --config=configs/gemma2_2b_lora_tpu.py \
#       --config.workdir=/mnt/shared/runs/gemma2 --config.model.path=/mnt/shared/gemma-2-2b
#
# The workdir (checkpoints: every worker writes its shards) must be one shared directory mounted at
# the same path on every worker (Filestore, or a GCS bucket through gcsfuse); the model and data
# must be readable at the same path on every worker. Environment: TPU and ZONE (required), PROJECT,
# SETUP=0 to skip the copy and install (rerun / resume), JAX_SPEC (default "jax[tpu]").
# Output of worker 0 is the one with the progress bar; a failure on any worker fails the command.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
if (($# == 0)); then
  echo "usage: TPU=NAME ZONE=ZONE $0 --config=configs/NAME.py [--config.a.b=value ...]" >&2
  exit 2
fi
gcloud=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
repo=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${SETUP:-1} != 0 ]]; then
  tar -C "$repo" --exclude=.git --exclude=runs -czf /tmp/ftjax-src.tgz .
  "${gcloud[@]}" scp /tmp/ftjax-src.tgz "$TPU":/tmp/ftjax-src.tgz --worker=all "${where[@]}"
  "${gcloud[@]}" ssh "$TPU" --worker=all "${where[@]}" --command="
    set -e; rm -rf ~/ftjax && mkdir -p ~/ftjax && tar -C ~/ftjax -xzf /tmp/ftjax-src.tgz
    pip install -q -U '${JAX_SPEC:-jax[tpu]}' && pip install -q -e ~/ftjax"
fi

# Quote every argument for the remote shell; all workers run the identical command.
"${gcloud[@]}" ssh "$TPU" --worker=all "${where[@]}" \
    --command="cd ~/ftjax && python -m ftjax.train $(printf '%q ' "$@")"
