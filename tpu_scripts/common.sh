#!/usr/bin/env bash
# Shared settings and helpers for tpu_scripts/*.sh (sourced, not run).
#
# Every setting comes from an environment variable with the default shown; export them once
# (or put them in tpu_scripts/env.sh, which is sourced when it exists) and every script agrees.
# No credentials live here: gcloud uses your own `gcloud auth login` session.

: "${TPU_NAME:=loopcoder-tpu}"              # TPU VM (node) name
: "${ZONE:=us-east5-a}"                     # zone that has your accelerator quota
: "${PROJECT:=}"                            # empty: gcloud's configured project
: "${ACCELERATOR_TYPE:=v5p-16}"             # slice: v4-8, v5p-16 (2 hosts), v5litepod-16, v6e-16...
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"      # TPU VM image (v4: tpu-ubuntu2204-base, v6e: v2-alpha-tpuv6e)
: "${QUEUED:=0}"                            # 1: ask through a queued resource (waits for capacity)
: "${SPOT:=0}"                              # 1: spot (preemptible) capacity
: "${QR_ID:=${TPU_NAME}-qr}"                # queued-resource id
: "${REPO_URL:=}"                           # git URL to pip-install from; empty = copy this checkout
: "${REPO_REF:=main}"                       # branch / tag / commit for REPO_URL
: "${REMOTE_DIR:=\$HOME/loopcoder-jax}"     # where the code lives on every worker
: "${VENV:=\$HOME/loopcoder-venv}"          # virtualenv on every worker
: "${LOG_DIR:=\$HOME/loopcoder-logs}"       # logs (and pid files) on every worker

if [[ -f "$(dirname "${BASH_SOURCE[0]}")/env.sh" ]]; then
  # shellcheck source=/dev/null
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
fi

DRY_RUN=0

# One word, quoted for a POSIX shell only when it needs it (readable, and copy-pasteable).
quote() {
  local word="$1"
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Prints a command, quoted, exactly as it will run; runs it unless --dry-run.
run() {
  local line="+" word
  for word in "$@"; do
    line+=" $(quote "$word")"
  done
  echo "$line"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# The zone/project flags every gcloud TPU command takes.
tpu_flags() {
  printf '%s\n' "--zone=${ZONE}"
  if [[ -n "$PROJECT" ]]; then
    printf '%s\n' "--project=${PROJECT}"
  fi
}

# Runs a bash command on TPU workers: tpu_ssh WORKER(all|0|1...) 'command'.
tpu_ssh() {
  local worker="$1" command="$2"
  local flags
  mapfile -t flags < <(tpu_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=${worker}" \
    "--command=${command}"
}

# Copies a local path to every worker: tpu_scp_all LOCAL REMOTE.
tpu_scp_all() {
  local src="$1" dst="$2"
  local flags
  mapfile -t flags < <(tpu_flags)
  run gcloud compute tpus tpu-vm scp "$src" "${TPU_NAME}:${dst}" "${flags[@]}" --worker=all
}

# Parses the options every script shares; the caller's usage text is in $USAGE.
# Leaves the remaining arguments in the global array ARGS.
parse_common() {
  ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help)
        echo "$USAGE"
        exit 0
        ;;
      -n | --dry-run)
        DRY_RUN=1
        ;;
      *)
        ARGS+=("$1")
        ;;
    esac
    shift
  done
}

# Shown at the end of every --help.
# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_HELP="Common options:
  -n, --dry-run   print the exact gcloud commands instead of running them
  -h, --help      this text

Settings (environment variables, or tpu_scripts/env.sh):
  TPU_NAME=${TPU_NAME} ZONE=${ZONE} PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE} RUNTIME_VERSION=${RUNTIME_VERSION}
  QUEUED=${QUEUED} SPOT=${SPOT} QR_ID=${QR_ID}
  REPO_URL=${REPO_URL:-<copy this checkout>} REPO_REF=${REPO_REF}
  REMOTE_DIR=${REMOTE_DIR} VENV=${VENV} LOG_DIR=${LOG_DIR}"
