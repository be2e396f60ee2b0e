#!/usr/bin/env bash
# univg set-up and entry points, for a machine that has only Python 3.10+.
#   bash run.sh demo   univg demo: corpus -> pretrain -> few-shot fine-tune at toy scale on a CPU, in runs/demo
#                      (extra arguments go to univg demo: --out DIR, --overwrite, --resume auto, --quick)
#   bash run.sh test   lint, type-check and run the test suite
#   bash run.sh setup  only create .venv and install univg into it
# Every install goes through constraints.txt (torch==2.13.0 and the rest pinned).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "run.sh: installing univg into .venv (first run only)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
case "${1:-}" in
  setup) ;;
  demo)
    univg demo "${@:2}"
    ;;
  test)
    ruff check .
    mypy
    pytest -q "${@:2}"
    ;;
  *) echo "usage: bash run.sh demo|test|setup" >&2; exit 2 ;;
esac
