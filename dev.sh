#!/usr/bin/env bash
# Set-up and everyday tasks on a fresh machine that has only Python 3.10+:
#   ./dev.sh demo        create .venv if needed, then run the main job on the built-in default
#   ./dev.sh language    create .venv if needed, then run the paper's language setting
#                        (examples/language.sh: English retain, Korean forget, alpha sweep)
#   ./dev.sh test [ARGS] create .venv if needed, then lint (ruff, import layers) and run the
#                        default test suite in two processes (UNDO_TEST_WORKERS=N for N, 0: one)
#   ./dev.sh setup       only create/refresh .venv
# torch's CPU build is installed first (requirements/cpu-constraints.txt pins it), so pip never
# pulls the multi-GB CUDA build. Set UNDO_TORCH_SPEC (e.g. "torch") to install another build.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${UNDO_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "dev.sh: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.undo-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
      || [ requirements/cpu-constraints.txt -nt "$stamp" ]; then
    echo "dev.sh: installing torch (CPU build) and undo with its dev extras into $VENV" >&2
    if [ -n "${UNDO_TORCH_SPEC:-}" ]; then
      "$VENV/bin/python" -m pip install -q "$UNDO_TORCH_SPEC"
      "$VENV/bin/python" -m pip install -q -e '.[dev]'
    else
      "$VENV/bin/python" -m pip install -q -r requirements/cpu-constraints.txt
      "$VENV/bin/python" -m pip install -q -c requirements/cpu-constraints.txt -e '.[dev]'
    fi
    touch "$stamp"
  fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup ;;
  demo)
    setup
    PATH="$(cd "$VENV" && pwd)/bin:$PATH" exec bash examples/arithmetic.sh "$@" ;;
  language)
    setup
    PATH="$(cd "$VENV" && pwd)/bin:$PATH" exec bash examples/language.sh "$@" ;;
  test)
    setup
    "$VENV/bin/ruff" check undo_cli tests benchmarks
    "$VENV/bin/lint-imports" --no-cache
    # Two pytest-xdist workers (UNDO_TEST_WORKERS; 0 runs in this process, e.g. for --pdb), each
    # given whole test files, so that a file's fixtures are built once; ARGS come after and win.
    exec "$VENV/bin/python" -m pytest -n "${UNDO_TEST_WORKERS:-2}" --dist loadfile \
      --no-loadscope-reorder "$@" ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2 ;;
esac
