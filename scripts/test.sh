#!/usr/bin/env bash
# Sets up .venv from the repository's own files, then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
# Two processes, each test file in one of them (its module fixtures built once): most tests wait on a job's own
# process, so two keep a 2-core machine busy. TEST_WORKERS=0 runs in this process alone.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
