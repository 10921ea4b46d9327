#!/usr/bin/env bash
# Runs tdm_jax on every worker of a Cloud TPU VM slice at once.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
# WORKDIR must be reachable from every worker (e.g. gs://bucket/run). The repo is copied from here.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo="$(cd "$(dirname "$0")/.." && pwd)"
gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu":~/tdm_jax --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/tdm_jax && pip install -q -e '.[tpu]' &&
  python -m tdm_jax.main --jax_distributed --config=$config --workdir=$workdir $*"
