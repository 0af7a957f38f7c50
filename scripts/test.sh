#!/usr/bin/env bash
# Installs what the tests need (torch first, from its CPU build) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
exec python -m pytest -q -p no:cacheprovider "$@"
