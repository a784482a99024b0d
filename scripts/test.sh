#!/usr/bin/env bash
# The whole test suite, plus lint and type checks: what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ckptmigrate tests scripts migrations
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
