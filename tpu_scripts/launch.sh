#!/usr/bin/env bash
# Starts train.py or infer.py on EVERY worker at once (one JAX process per host).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/launch.sh train|infer [--dry-run] [-- ARGS...]

Runs \$VENV/bin/python {train,infer}.py ARGS on every worker in the background
(nohup), logging to \$LOG_DIR/<job>.log and recording the pid in \$LOG_DIR/<job>.pid on each
worker. train.py gets --distributed: jax.distributed.initialize() finds the coordinator and
the process ids from the TPU metadata, so all hosts form one job.
Extra environment for the job: set JOB_ENV, e.g. JOB_ENV='LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=65536'.

Examples:
  tpu_scripts/launch.sh train -- --config configs/dense7b.yaml --set train.run_dir=/mnt/gcs/runs/a
  tpu_scripts/launch.sh infer -- --checkpoint /mnt/gcs/loop40b --prompt 'def fib(n):'

${COMMON_HELP}"

: "${JOB_ENV:=}"
parse_common "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
[[ $# -ge 1 ]] || die "say which job: train or infer (see --help)"
JOB="$1"
shift
case "$JOB" in
  train) SCRIPT=train.py; JOB_ARGS=(--distributed) ;;
  infer) SCRIPT=infer.py; JOB_ARGS=() ;;
  *) die "unknown job '$JOB': use train or infer" ;;
esac
if [[ "${1:-}" == "--" ]]; then
  shift
fi
JOB_ARGS+=("$@")

QUOTED=""
for a in "${JOB_ARGS[@]+"${JOB_ARGS[@]}"}"; do
  QUOTED+=" $(printf '%q' "$a")"
done
LOG="${LOG_DIR}/${JOB}.log"
PID="${LOG_DIR}/${JOB}.pid"
tpu_ssh all "set -e; mkdir -p ${LOG_DIR}; cd ${REMOTE_DIR}; if [ -f ${PID} ] && kill -0 \$(cat ${PID}) 2>/dev/null; then echo '${JOB} already running on '\$(hostname); exit 1; fi; ${JOB_ENV:+export ${JOB_ENV}; }nohup ${VENV}/bin/python ${SCRIPT}${QUOTED} > ${LOG} 2>&1 < /dev/null & echo \$! > ${PID}; echo started ${JOB} on \$(hostname) pid \$(cat ${PID})"
echo "next: tpu_scripts/logs.sh ${JOB}"
