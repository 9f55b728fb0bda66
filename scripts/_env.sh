# Sourced by the other scripts: creates .venv on first use and reinstalls the
# project whenever pyproject.toml changes, so a fresh clone needs no manual step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp="$VENV/.dsgd-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${DSGD_EXTRAS:-dev}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "dsgd: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "dsgd: installing dsgd[${DSGD_EXTRAS:-dev}] into $VENV (first run takes a minute)" >&2
    log="$VENV/install.log"
    if ! "$VENV/bin/python" -m pip install -e "$ROOT[${DSGD_EXTRAS:-dev}]" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "dsgd: installing into $VENV failed (full log: $log); fix the cause and rerun" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
