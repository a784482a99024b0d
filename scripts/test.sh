#!/usr/bin/env bash
# The whole test suite, plus lint and type checks: what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ckptmigrate tests scripts migrations
.venv/bin/mypy
# Two processes, a test file each at a time (a file's servers and clusters start once, in its
# process): most tests wait on subprocesses and servers, so two overlap well on two cores.
.venv/bin/python -m pytest -q -n "${CKPTMIGRATE_TEST_PROCESSES:-2}" --dist loadfile "$@"
