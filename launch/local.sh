#!/usr/bin/env bash
# Runs tdm_jax on every device of this host. Usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
exec python -m tdm_jax.main --config="$config" --workdir="$workdir" "$@"
