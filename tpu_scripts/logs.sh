#!/usr/bin/env bash
# Shows (follows) a job's log on one worker, or the last lines of every worker's log.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/logs.sh train|infer [--worker N|all] [--lines N] [--dry-run]

Follows \$LOG_DIR/<job>.log on worker N (default 0: process 0 logs the metrics). With
--worker all it prints the last lines of every worker's log once (no follow).

${COMMON_HELP}"

parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
[[ $# -ge 1 ]] || die "say which job: train or infer (see --help)"
JOB="$1"
shift
[[ "$JOB" == train || "$JOB" == infer ]] || die "unknown job '$JOB': use train or infer"
WORKER=0 LINES=100
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    --lines) LINES="${2:?--lines needs a value}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
LOG="${LOG_DIR}/${JOB}.log"
if [[ "$WORKER" == all ]]; then
  tpu_ssh all "echo \"== \$(hostname)\"; tail -n ${LINES} ${LOG}"
else
  tpu_ssh "$WORKER" "tail -n ${LINES} -F ${LOG}"
fi
