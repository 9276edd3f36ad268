#!/usr/bin/env bash
# Set up a development environment in .venv: the project with its service and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
# With --system, also the Debian packages the service and browser tests need, when missing:
# redis-server, and Chromium with its driver for the web page's test.
if [[ "${1:-}" == "--system" ]]; then
    missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
    if (( ${#missing[@]} )); then
        echo "bootstrap: installing ${missing[*]}" >&2
        SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
