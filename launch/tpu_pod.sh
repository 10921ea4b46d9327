#!/usr/bin/env bash
# Distils on every worker of a Cloud TPU VM slice at once: create it (or reuse it), install the repo
# on every worker, run the same command everywhere with --jax_distributed (JAX finds the workers by
# itself on TPU VMs), and copy the results out.
#
# Usage: launch/tpu_pod.sh [options] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   --create TYPE     create the slice if it does not exist, e.g. v5litepod-32 (default: it must exist)
#   --queued          create it through a queued resource (waits until it is provisioned)
#   --spot            a spot / preemptible slice
#   --version V       TPU VM software version (default tpu-ubuntu2204-base)
#   --bucket gs://B   mount bucket B with gcsfuse at /mnt/tdm on every worker; a relative WORKDIR goes there
#   --copy-out DIR    afterwards copy WORKDIR's eval/, export/ and metrics.jsonl from worker 0 into DIR
#   --dry-run         print every command, run nothing
# WORKDIR must be one folder that every worker reaches (the --bucket mount, or NFS / Filestore):
# all workers write their shards of each checkpoint into it.
set -euo pipefail
DRY_RUN=0 accelerator="" queued=0 spot=0 version=tpu-ubuntu2204-base bucket="" copy_out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --create) accelerator=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --version) version=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    --copy-out) copy_out=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then
  echo "usage: $0 [--dry-run] [--create TYPE [--queued] [--spot]] [--bucket gs://B] [--copy-out DIR] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "$0")/common.sh"
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo="$(repo_root)"
mount=/mnt/tdm
if [ -n "$bucket" ] && [ "${workdir#/}" = "$workdir" ]; then
  workdir="$mount/$workdir"
fi
tpu_vm=(gcloud compute tpus tpu-vm)
on_all=("${tpu_vm[@]}" ssh "$tpu" --zone="$zone" --worker=all)

# 1. The slice: reuse it, or create it when --create is given.
if [ -n "$accelerator" ]; then
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  if [ "$DRY_RUN" = 1 ]; then
    echo "# if $tpu does not exist yet ($(show "${tpu_vm[@]}" describe "$tpu" --zone="$zone") fails):"
  fi
  if [ "$DRY_RUN" = 1 ] || ! "${tpu_vm[@]}" describe "$tpu" --zone="$zone" >/dev/null 2>&1; then
    if [ "$queued" = 1 ]; then
      run gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" --zone="$zone" \
        --accelerator-type="$accelerator" --runtime-version="$version" "${extra[@]}"
      if [ "$DRY_RUN" = 1 ]; then
        echo "# then wait until $(show gcloud compute tpus queued-resources describe "$tpu" --zone="$zone") says ACTIVE"
      else
        until gcloud compute tpus queued-resources describe "$tpu" --zone="$zone" --format='value(state.state)' \
            | grep -q ACTIVE; do sleep 30; done
      fi
    else
      run "${tpu_vm[@]}" create "$tpu" --zone="$zone" --accelerator-type="$accelerator" --version="$version" \
        "${extra[@]}"
    fi
  fi
fi

# 2. The same code and environment on every worker.
run "${tpu_vm[@]}" scp --recurse "$repo" "$tpu":~/ --zone="$zone" --worker=all
name=$(basename "$repo")
run "${on_all[@]}" --command="cd ~/$name && python3 -m pip install -q -e '.[tpu]'"
if [ -n "$bucket" ]; then
  run "${on_all[@]}" --command="(command -v gcsfuse || (sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse)) \
&& sudo mkdir -p $mount && sudo chown \$USER $mount && (mountpoint -q $mount || gcsfuse --implicit-dirs ${bucket#gs://} $mount)"
fi

# 3. One command, the same on every worker.
args=$(show "$@")
run "${on_all[@]}" --command="cd ~/$name && python3 -m tdm_jax.main --jax_distributed --config=$config --workdir=$workdir $args"

# 4. Results out (worker 0 wrote them).
if [ -n "$copy_out" ]; then
  run mkdir -p "$copy_out"
  for item in eval export metrics.jsonl config.json; do
    run "${tpu_vm[@]}" scp --recurse "$tpu:$workdir/$item" "$copy_out/" --zone="$zone" --worker=0
  done
fi
