#!/usr/bin/env bash
# Lint, type-check and test dsgd. Extra arguments go to pytest
# (e.g. scripts/test.sh -m slow, scripts/test.sh tests/test_wire.py).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
echo "== ruff" >&2
ruff check .
ruff format --check .
echo "== mypy" >&2
mypy
echo "== pytest" >&2
pytest "$@"
