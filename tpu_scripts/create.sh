#!/usr/bin/env bash
# Creates the TPU slice: a TPU VM directly, or (QUEUED=1) a queued resource that waits for
# capacity, then waits until the slice is READY / ACTIVE.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/create.sh [--no-wait] [--dry-run]

Creates TPU VM \$TPU_NAME (\$ACCELERATOR_TYPE, image \$RUNTIME_VERSION) in \$ZONE.
QUEUED=1 goes through 'gcloud compute tpus queued-resources create' (recommended for v5p
and large slices); SPOT=1 asks for spot capacity.

  --no-wait       return right after the create request

${COMMON_HELP}"

parse_common "$@"
WAIT=1
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --no-wait) WAIT=0 ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done

mapfile -t FLAGS < <(tpu_flags)
EXTRA=()
if [[ "$SPOT" == 1 ]]; then
  EXTRA+=(--spot)
fi

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$QR_ID" "${FLAGS[@]}" \
    "--node-id=${TPU_NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" \
    "--runtime-version=${RUNTIME_VERSION}" "${EXTRA[@]+"${EXTRA[@]}"}"
  STATE_CMD=(gcloud compute tpus queued-resources describe "$QR_ID" "${FLAGS[@]}"
    "--format=value(state.state)")
  READY=ACTIVE
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${FLAGS[@]}" \
    "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}" \
    "${EXTRA[@]+"${EXTRA[@]}"}"
  STATE_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${FLAGS[@]}"
    "--format=value(state)")
  READY=READY
fi

if [[ "$WAIT" == 1 ]]; then
  run "${STATE_CMD[@]}"
  if [[ "$DRY_RUN" == 0 ]]; then
    echo "waiting for state ${READY} (Ctrl-C is safe: the request stays queued)..."
    while true; do
      state="$("${STATE_CMD[@]}" 2>/dev/null || true)"
      echo "  state: ${state:-unknown}"
      [[ "$state" == "$READY" ]] && break
      case "$state" in
        FAILED | SUSPENDED) die "the slice is ${state}; see: ${STATE_CMD[*]%--format*}" ;;
      esac
      sleep 30
    done
  fi
fi
echo "next: tpu_scripts/setup.sh"
