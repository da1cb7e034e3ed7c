#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian's packages (chromium, chromium-driver) when
# missing: the browser test of the Snakemake report (tests/test_report.py) needs them. Needs root
# (or sudo) and apt-get; elsewhere it says what to install and exits 0 (the test then reports it).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if ! command -v apt-get >/dev/null || { [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; }; then
  echo "install_browser: install Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)" >&2
  exit 0
fi
echo "installing chromium and chromium-driver (Debian packages) for the report's browser test" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
echo "browser ready: $(chromium --version 2>/dev/null | head -1)" >&2
