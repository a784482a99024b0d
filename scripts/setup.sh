#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with ckptmigrate (editable) and its test tools,
# torch pinned to the CPU build through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.ckptmigrate-installed
# (again when the C fast paths or their build changed: an editable install compiles them in place)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
        || [ setup.py -nt "$stamp" ] || [ -n "$(find ckptmigrate -name '_*.c' -newer "$stamp")" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,lightning]"
    touch "$stamp"
fi
# System tools the tests use for real: xfsprogs for the copy-on-write (reflink) tests on an XFS loop
# mount, strace for the SIGKILLs placed at an exact write. Installed where we may (root with apt, as
# on CI); elsewhere those tests say why they skip.
missing=""
command -v mkfs.xfs >/dev/null 2>&1 || missing="$missing xfsprogs"
command -v strace >/dev/null 2>&1 || missing="$missing strace"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -q $missing >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null; }
fi
# Azurite, the Azure Blob Storage emulator (on npm only), for the az:// tests: in .venv/azurite,
# pinned. A failed install is not fatal here; the az:// tests then fail saying so.
azurite=3.35.0
if command -v npm >/dev/null 2>&1 && ! grep -qs "\"version\": \"$azurite\"" .venv/azurite/node_modules/azurite/package.json; then
    npm install --prefix .venv/azurite --no-audit --no-fund --silent "azurite@$azurite" >/dev/null 2>&1 \
        || echo "setup.sh: npm could not install azurite@$azurite (the az:// tests need it)" >&2
fi
