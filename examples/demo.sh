#!/usr/bin/env bash
# The README's main-job command: install (idempotent), then run the plugin's main job.
# The main job: `instructedit demo` on the embedded Gemma-3-270M (pass --quick for a shorter run).
# Data: --data_dir, else $INSTRUCTEDIT_DATA_DIR, else the demo data set packaged with the plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
instructedit demo "$@"
