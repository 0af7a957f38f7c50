#!/usr/bin/env bash
# Installs Swarm (torch first, from its CPU build) and runs the demo: a local swarm generating text.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
exec python examples/demo.py "$@"
