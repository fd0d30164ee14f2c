#!/usr/bin/env bash
# Create .venv (installing Debian's python3-venv first if this Python lacks venv/ensurepip) and
# install the pinned requirements file given as $1 into it. Sourced by serve.sh and test.sh.
set -euo pipefail

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_venv() {
  local requirements=$1
  if [ ! -x .venv/bin/python ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
      sudo_if_needed apt-get update -qq
      DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --disable-pip-version-check -r "$requirements"
}
