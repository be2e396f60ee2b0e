#!/usr/bin/env bash
# univg set-up and entry points, for a machine that has only Python 3.10+.
#   bash run.sh demo   build the tiny corpus and write its preview picture
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
    univg shards build --config configs/corpus/tiny.yaml --out data/shards/tiny "${@:2}"
    univg shards preview data/shards/tiny --out data/shards/tiny/preview.png
    echo "preview picture: data/shards/tiny/preview.png"
    ;;
  test)
    ruff check .
    mypy
    pytest -q "${@:2}"
    ;;
  *) echo "usage: bash run.sh demo|test|setup" >&2; exit 2 ;;
esac
