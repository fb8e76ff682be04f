#!/usr/bin/env bash
# Deletes the slice (the TPU VM, or the queued resource and its VM). Billing stops here.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/delete.sh --yes [--dry-run]

Deletes TPU VM \$TPU_NAME (QUEUED=1: queued resource \$QR_ID with its VM). Everything on
the VMs' disks is lost: keep checkpoints on the mounted bucket (/mnt/gcs). --yes is required (no prompt).

${COMMON_HELP}"

parse_common "$@"
YES=0
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --yes) YES=1 ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
[[ "$YES" == 1 || "$DRY_RUN" == 1 ]] || die "this deletes ${TPU_NAME}; pass --yes to confirm"

mapfile -t FLAGS < <(tpu_flags)
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$QR_ID" "${FLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${FLAGS[@]}" --quiet
fi
