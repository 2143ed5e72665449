#!/usr/bin/env bash
# Set up (with the test, ray and serve extras, and the OS's Chromium for the page's browser test), compile the
# numba kernels once (scripts/warm.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,ray,serve
bash scripts/browser.sh
bash scripts/warm.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=25 "$@"
