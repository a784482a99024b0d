#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with ckptmigrate (editable) and its test tools,
# torch pinned to the CPU build through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.ckptmigrate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,lightning]"
    touch "$stamp"
fi
