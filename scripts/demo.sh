#!/usr/bin/env bash
# The main job: install skyloop into .venv and run the example training pipeline end to end
# on the embedded defaults (SQLite, local artifact folder, local worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[examples]'
export SKYLOOP_HOME="${SKYLOOP_HOME:-$PWD/.skyloop}"
.venv/bin/skyloop run examples/train.py:training_pipeline "$@"
# A second run shows content-addressed caching: every step comes back CACHED.
.venv/bin/skyloop run examples/train.py:training_pipeline "$@"
