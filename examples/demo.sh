#!/usr/bin/env bash
# The README's main-job command: install (idempotent), then run the plugin's main job.
# The main job: `instructedit demo` on the embedded Gemma-3-270M (pass --quick for ~2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export INSTRUCTEDIT_DATA_DIR="${INSTRUCTEDIT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
instructedit demo "$@"
