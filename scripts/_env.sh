# Sourced by the other scripts: creates .venv on first use and installs the exact
# versions in requirements.lock (hash-checked) whenever the lock or pyproject.toml
# changes, so a fresh clone needs no manual step and a release upstream changes nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp="$VENV/.dsgd-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "dsgd: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "dsgd: installing requirements.lock and dsgd into $VENV (first run takes a minute)" >&2
    log="$VENV/install.log"
    if ! { "$VENV/bin/python" -m pip install --require-hashes --no-deps -r "$ROOT/requirements.lock" &&
        "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$ROOT"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "dsgd: installing into $VENV failed (full log: $log); fix the cause and rerun" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
