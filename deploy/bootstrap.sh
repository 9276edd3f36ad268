#!/usr/bin/env bash
# Set up a development environment in .venv: the project with its service and test extras.
# With --system, also install the Debian packages the service tests need (redis-server) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--system" ]] && ! command -v redis-server >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
