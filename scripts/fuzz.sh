#!/usr/bin/env bash
# The long fuzz run of the checkpoint readers: the hypothesis tests of tests/test_fuzz_readers.py
# with many examples, then (when atheris installs) a coverage-guided run of scripts/fuzz_atheris.py.
#
#   bash scripts/fuzz.sh                      # 20,000 examples per test, then 10 minutes of atheris
#   CKPTMIGRATE_FUZZ_EXAMPLES=2000 CKPTMIGRATE_ATHERIS_SECONDS=0 bash scripts/fuzz.sh   # shorter, no atheris
#
# Idempotent: it sets up the project's .venv as scripts/test.sh does and leaves nothing in the work
# tree (hypothesis keeps its example database in the ignored .hypothesis/, so a failure found once
# is tried first next time). Extra arguments go to pytest. Exits non-zero on any finding; atheris'
# crashing input is kept in the directory it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

examples="${CKPTMIGRATE_FUZZ_EXAMPLES:-20000}"
seconds="${CKPTMIGRATE_ATHERIS_SECONDS:-600}"
echo "== hypothesis: $examples examples per test"
start=$SECONDS
CKPTMIGRATE_FUZZ_EXAMPLES="$examples" .venv/bin/python -m pytest -q tests/test_fuzz_readers.py \
    -p no:cacheprovider --hypothesis-show-statistics "$@"
echo "== hypothesis done in $((SECONDS - start)) s"

if [ "$seconds" = 0 ]; then
    exit 0
fi
if ! .venv/bin/python -c "import atheris" 2>/dev/null; then
    if ! .venv/bin/pip install --quiet --disable-pip-version-check atheris >/dev/null 2>&1; then
        echo "== atheris does not install here: coverage-guided run skipped"
        exit 0
    fi
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/ckptmigrate-fuzz-XXXXXX")"
echo "== atheris: $seconds s (corpus and any crashing input in $work)"
if .venv/bin/python scripts/fuzz_atheris.py "$work/corpus" -max_total_time="$seconds" -timeout=20 \
        -rss_limit_mb=4096 -artifact_prefix="$work/" -print_final_stats=1; then
    rm -rf "$work"
    echo "== atheris: no finding"
else
    echo "== atheris found a problem: the input is in $work" >&2
    exit 1
fi
