#!/usr/bin/env bash
# Copies a Hugging Face checkpoint to the slice and converts it to an Orbax params checkpoint.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/weights.sh --src SRC --dst DST [--dtype bfloat16] [--dry-run]

Runs on worker 0 (conversion streams layer by layer; no TPU memory is used):
  1. fetches the HF safetensors checkpoint SRC to local disk:
       SRC = gs://bucket/path      -> gcloud storage cp -r
       SRC = hf:ORG/NAME           -> huggingface-cli download (log in on the VM first
                                      if the repository is gated)
       SRC = /path/on/the/vm       -> used as is
  2. python -m loopcoder_jax.convert hf-to-orbax <local copy> DST --dtype DTYPE

DST must be readable by every worker: a path on a bucket mounted at the same place on every
worker (gcsfuse, e.g. /mnt/gcs/...) or a shared filesystem; gs:// URLs are not accepted yet
(checkpoints commit by renaming a finished temporary directory). Then: launch.sh train ... --set
train.init_from=DST, or launch.sh infer ... --checkpoint DST.

${COMMON_HELP}"

parse_common "$@"
SRC="" DST="" DTYPE="bfloat16"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --src) SRC="${2:?--src needs a value}"; shift ;;
    --dst) DST="${2:?--dst needs a value}"; shift ;;
    --dtype) DTYPE="${2:?--dtype needs a value}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
[[ -n "$SRC" && -n "$DST" ]] || die "--src and --dst are required (see --help)"

LOCAL="/tmp/hf-checkpoint"
case "$SRC" in
  gs://*) FETCH="rm -rf ${LOCAL} && mkdir -p ${LOCAL} && gcloud storage cp -r '${SRC%/}/*' ${LOCAL}/" ;;
  hf:*) FETCH="${VENV}/bin/pip install -q 'huggingface_hub[cli]' && ${VENV}/bin/huggingface-cli download ${SRC#hf:} --local-dir ${LOCAL}" ;;
  *) FETCH="true"; LOCAL="$SRC" ;;
esac
tpu_ssh 0 "set -e; ${FETCH}; cd ${REMOTE_DIR}; ${VENV}/bin/python -m loopcoder_jax.convert hf-to-orbax ${LOCAL} ${DST} --dtype ${DTYPE}"
