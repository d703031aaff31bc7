#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh demo   -> set up .venv and run the end-to-end demo on generated phantoms
#   bash run.sh test   -> set up .venv (with test extras), ruff + mypy, then the whole test suite
# Extra arguments are passed through (e.g. `bash run.sh test -k collection`).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${NNSSL_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup_env() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # Re-install only when the project's metadata changed since the last install.
    local stamp="$VENV/.nnssl-install-stamp"
    local want
    want="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)-$extras"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]" 2> >(grep -v "is ignored: it is neither" >&2)
        echo "$want" > "$stamp"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        setup_env test
        exec "$VENV/bin/nnssl_demo" "$@"
        ;;
    test)
        setup_env test
        # lint and type-check first (seconds): style and typed-seam errors fail the run like a test
        "$VENV/bin/ruff" check src tests benchmarks
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
