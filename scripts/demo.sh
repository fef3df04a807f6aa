#!/usr/bin/env bash
# The README's main-job command: set up what is missing, then run the demo node end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
