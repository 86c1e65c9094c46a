#!/usr/bin/env bash
# Quick start: install into .venv and run the demo on the built-in tiny model (out/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m r0_core.demo "$@"
