#!/usr/bin/env bash
# Copy this repository to every host of a TPU VM slice and install jaxft with the TPU extra.
# usage: tpu/setup.sh TPU_NAME ZONE
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}
root=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxft-src.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxft-src.tgz "$name":/tmp/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command='
  set -e; mkdir -p ~/jaxft && tar -C ~/jaxft -xzf /tmp/jaxft-src.tgz && cd ~/jaxft &&
  python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e ".[tpu]"'
