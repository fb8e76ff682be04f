#!/usr/bin/env bash
# Installs loopcoder-jax with the `tpu` extra on EVERY worker of the slice.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu_scripts/setup.sh [--dry-run]

On every worker: creates the virtualenv \$VENV and installs loopcoder-jax[tpu] into it.
Source: REPO_URL@REPO_REF when REPO_URL is set, else this checkout (its committed HEAD,
packed with 'git archive' and copied to every worker).

${COMMON_HELP}"

parse_common "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "unknown option '${ARGS[0]}' (see --help)"

PREPARE="set -e; python3 -m venv ${VENV}; ${VENV}/bin/pip install -q --upgrade pip"
if [[ -n "$REPO_URL" ]]; then
  INSTALL="rm -rf ${REMOTE_DIR} && git clone -q ${REPO_URL} ${REMOTE_DIR} && git -C ${REMOTE_DIR} checkout -q ${REPO_REF}"
else
  ROOT="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
  TARBALL="/tmp/loopcoder-jax-src.tar.gz"
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  tpu_scp_all "$TARBALL" /tmp/loopcoder-jax-src.tar.gz
  INSTALL="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf /tmp/loopcoder-jax-src.tar.gz -C ${REMOTE_DIR}"
fi
tpu_ssh all "${PREPARE}; ${INSTALL}; ${VENV}/bin/pip install -q -e '${REMOTE_DIR}[tpu]'; mkdir -p ${LOG_DIR}; ${VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
echo "next: tpu_scripts/weights.sh (optional), then tpu_scripts/launch.sh"
