#!/usr/bin/env bash
# The main job: the demo of nfn-plugins on bundled real data. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
nfn-plugins demo "$@"
