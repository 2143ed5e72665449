#!/usr/bin/env bash
# Set up (with the test and ray extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,ray
exec .venv/bin/python -m pytest -q -n 2 --durations=25 "$@"
