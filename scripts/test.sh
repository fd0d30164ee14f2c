#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run the whole suite.
# Debian packages: redis-server, redis-sentinel, chromium + chromedriver (browser test), node + npm (ws interop),
# nginx (tests/test_deploy.py runs deploy/nginx/wsapp.conf in front of two servers).
# Python packages: requirements-dev.txt into .venv. Node packages: tests/package-lock.json.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rooms`.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv.sh

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v taskset >/dev/null || missing+=(util-linux)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ensure_venv requirements-dev.txt
npm ci --prefix tests --no-audit --no-fund --loglevel=error

.venv/bin/ruff check .
.venv/bin/mypy wsapp server.py
exec .venv/bin/python -m pytest "$@"
