#!/usr/bin/env bash
# Runs tdm_jax on this host: all its devices in one process, or N local processes that form one job
# (what a pod does, on one machine: e.g. CPU devices split over processes to try multi-process runs).
#
# Usage: launch/local.sh [--dry-run] [--processes N] [--devices-per-process D] [--port P] \
#          CONFIG WORKDIR [--config.key=value ...]
#   --processes N            start N processes joined by jax.distributed (default 1)
#   --devices-per-process D  CPU only: fake D host devices per process (XLA_FLAGS)
#   --port P                 the coordinator's port on 127.0.0.1 (default 8476)
#   --dry-run                print the commands and environment, run nothing
set -euo pipefail
DRY_RUN=0 processes=1 devices="" port=8476
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --processes) processes=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "usage: $0 [--dry-run] [--processes N] [--devices-per-process D] [--port P] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "$0")/common.sh"
config=$1 workdir=$2
shift 2
cd "$(repo_root)"
xla=()
if [ -n "$devices" ]; then
  xla=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices" "JAX_PLATFORMS=cpu")
fi
if [ "$processes" = 1 ]; then
  if [ ${#xla[@]} -gt 0 ]; then
    run env "${xla[@]}" python -m tdm_jax.main --config="$config" --workdir="$workdir" "$@"
  else
    run python -m tdm_jax.main --config="$config" --workdir="$workdir" "$@"
  fi
  exit $?
fi
pids=()
for ((i = 0; i < processes; i++)); do
  cmd=(env "${xla[@]}" TDM_COORDINATOR_ADDRESS="127.0.0.1:$port" TDM_NUM_PROCESSES="$processes" TDM_PROCESS_ID="$i"
       python -m tdm_jax.main --jax_distributed --config="$config" --workdir="$workdir" "$@")
  if [ "$DRY_RUN" = 1 ]; then
    show "${cmd[@]}"
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
