#!/usr/bin/env bash
# System packages the test suite needs: Debian's headless Chromium and its driver (the Monitor's browser test).
# Playwright's own browser download does not work offline, so the tests point Playwright at /usr/bin/chromium.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: /usr/bin/chromium is missing; install Debian's 'chromium' package for the browser test." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null \
  || echo "setup: could not install chromium; the browser test will fail." >&2
