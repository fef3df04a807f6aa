#!/usr/bin/env bash
# The README's main-job command. The full demo lands with the demo issue.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "the end-to-end demo is not yet available; run 'bash scripts/test.sh' for the test suite"
