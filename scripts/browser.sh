#!/usr/bin/env bash
# Install Debian's Chromium for the page's browser test (tests/test_page.py), if it is not there.
# Playwright drives this executable; no browser is downloaded.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "setup: chromium is missing and this user cannot install it (apt-get install chromium); the browser test will say so" >&2
  exit 0
fi
echo "setup: installing chromium from the OS packages for the browser test (a minute)" >&2
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
echo "setup: chromium $(chromium --version 2>/dev/null | awk '{print $2}') installed" >&2
