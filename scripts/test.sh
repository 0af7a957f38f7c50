#!/usr/bin/env bash
# Installs what the tests need (torch first, from its CPU build) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
# The dashboard test drives a real headless browser (Debian's chromium).
if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
    else
        echo "chromium is missing (apt-get install chromium): the dashboard test will fail" >&2
    fi
fi
# The network test bed (tests/netbed) builds NAT routers with nftables.
if ! command -v nft > /dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables > /dev/null
fi
exec python -m pytest -q -p no:cacheprovider "$@"
