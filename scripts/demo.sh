#!/usr/bin/env bash
# The main job: install skyloop into .venv and run `skyloop demo` end to end on the embedded defaults
# (SQLite, a local artifact folder, local processes): train, deploy, drift, retrain, gate, canary, promote.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[examples]'
export SKYLOOP_HOME="${SKYLOOP_HOME:-$PWD/.skyloop}"
.venv/bin/skyloop demo "$@"
