#!/usr/bin/env bash
# Thin wrapper, as Dynamo's benchmarks/llm/perf.sh: every argument goes to benchmarks/perf.py.
#   benchmarks/perf.sh --mode both --isl 512 --osl 64 --concurrency 1 2 4 8 16 32
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
exec "$PY" "$ROOT/benchmarks/perf.py" "$@"
