#!/usr/bin/env bash
# The main job: the demo of nfn-plugins on bundled real data. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# glibc keeps freed memory for reuse: the NFN's full-size tensors on MiniLM are otherwise page-faulted in
# again on every call (benchmarks/results/nfn_scale.md: 2.6 s -> 1.9 s per forward)
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-17179869184}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}"
nfn-plugins demo "$@"
