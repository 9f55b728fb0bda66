#!/usr/bin/env bash
# Update requirements.lock: every package dsgd, its tests and benchmarks need, at an
# exact version with hashes, resolved from the ranges in pyproject.toml. The README's
# commands and CI install from the lock, so a release upstream never changes a run until
# this script is rerun and its result committed. Extra arguments go to `uv pip compile`
# (e.g. scripts/lock.sh --upgrade-package grpcio-tools).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
UV_VERSION=0.13.10
tools="$ROOT/.venv-lock"
if [ "$("$tools/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    echo "dsgd: installing uv $UV_VERSION into $tools" >&2
    "${PYTHON:-python3}" -m venv "$tools"
    "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
cd "$ROOT"
# setuptools builds the editable install (pip runs it without build isolation, from the lock)
echo "setuptools>=77" | "$tools/bin/uv" pip compile pyproject.toml - \
    --extra dev --extra bench --generate-hashes --universal --python-version 3.11 \
    --no-header --quiet --output-file requirements.lock "$@"
echo "dsgd: wrote requirements.lock; rerun scripts/gen_protos.sh if grpcio-tools moved" >&2
