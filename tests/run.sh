#!/usr/bin/env bash
# Run the whole test suite. Installs what it needs (the project in .venv, redis-server when missing);
# the tests start their own Redis, SeaweedFS and Celery workers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh --system
exec .venv/bin/python -m pytest "$@"
