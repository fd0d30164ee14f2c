#!/usr/bin/env bash
# Install the runtime dependencies into .venv and run the server (in-memory broker; $PORT, default 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv requirements.txt
exec .venv/bin/python server.py
