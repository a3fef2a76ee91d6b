#!/usr/bin/env bash
# Start (or resume) a training run on every host of a TPU VM slice at once.
# usage: tpu/launch.sh TPU_NAME ZONE CONFIG.yaml [key=value ...]
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; shift 3
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/jaxft && .venv/bin/jaxft train $config $overrides --no-progress 2>&1 | tee -a ~/jaxft-train.log"
