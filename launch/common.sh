# Shared by the launch scripts: --dry-run handling and printing commands exactly as they would run.
# Source it after setting DRY_RUN=0|1.

# Prints a command (env assignments first) in a form a shell can paste back, one per line.
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# Runs a command, or with --dry-run only prints it.
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    show "$@"
  else
    "$@"
  fi
}

# The repository root (the scripts live in launch/).
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
