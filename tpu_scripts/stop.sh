#!/usr/bin/env bash
# Stops a job on every worker (SIGTERM to the recorded pid: train.py checkpoints and exits).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/stop.sh train|infer [--kill] [--dry-run]

Sends SIGTERM to the pid in \$LOG_DIR/<job>.pid on every worker (the trainer saves a
checkpoint and exits); --kill sends SIGKILL instead. Nothing else on the VMs is touched.

${COMMON_HELP}"

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
[[ $# -ge 1 ]] || die "say which job: train or infer (see --help)"
JOB="$1"
shift
[[ "$JOB" == train || "$JOB" == infer ]] || die "unknown job '$JOB': use train or infer"
SIGNAL=TERM
for arg in "$@"; do
  case "$arg" in
    --kill) SIGNAL=KILL ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
PID="${LOG_DIR}/${JOB}.pid"
tpu_ssh all "if [ -f ${PID} ] && kill -0 \$(cat ${PID}) 2>/dev/null; then kill -${SIGNAL} \$(cat ${PID}); echo \"sent ${SIGNAL} to ${JOB} on \$(hostname)\"; else echo \"no running ${JOB} on \$(hostname)\"; fi"
