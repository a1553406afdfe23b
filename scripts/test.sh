#!/usr/bin/env bash
# Sets up .venv from the repository's own files, then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pytest "$@"
