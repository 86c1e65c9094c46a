#!/usr/bin/env bash
# Build the tiny world on 2 cores: independent stages run two at a time, one thread each. Every stage resumes
# from its checkpoint under build/tiny, so after a stop rerun the same command. Extra arguments go to every stage
# (for example --work DIR --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
build() { HF_HUB_OFFLINE=1 "$PY" -m r0_core.tiny.build "$@"; }
pair() {  # two stages at once; fail if either fails
    build --only "$1" "${@:3}" & local first=$!
    build --only "$2" "${@:3}"
    wait "$first"
}
build --only data "$@"
pair vae clip "$@"
pair reward unet "$@"
build "$@"   # the remaining stages: save the world, then the reward stack from its samples
