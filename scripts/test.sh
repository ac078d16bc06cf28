#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the CPU test suite: 8 virtual CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
