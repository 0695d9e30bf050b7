#!/usr/bin/env bash
# Headless Chromium for the browser tests (cost report rendering, Prefect UI): Debian's `chromium`
# package, driven by the Python `playwright` package with executable_path=/usr/bin/chromium.
# Never `playwright install` (it downloads browsers from the internet). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "chromium: installing Debian's chromium package" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
