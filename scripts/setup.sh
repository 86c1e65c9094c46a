#!/usr/bin/env bash
# Create .venv (once) and install the pack with its test extra; demo.sh, .ci/run and the README use it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Keep a torch that is already there (a CUDA build, say); otherwise take the CPU build 2.13.0.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
