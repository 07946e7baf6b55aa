#!/usr/bin/env bash
# Idempotent dev environment: .venv with pinned deps, source roots on sys.path, codegen.
# Safe to run repeatedly; a stamp keyed on the requirement files skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.tandem-deps"
want=$(cat requirements/base.txt requirements/constraints.txt build-support/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (first run takes a few minutes)"
  # The CPU build of torch first: anything that asks for plain 'torch' would otherwise
  # pull a multi-GB CUDA build from PyPI.
  $PIP install "torch==2.13.0"
  # Triton runs the GPU kernels' CPU tests through its interpreter (TRITON_INTERPRET=1). Pinned
  # here, not in constraints.txt, whose pins are the Pants lock's (the PEXes do not carry it yet).
  $PIP install "triton==3.9.0"
  # import-linter checks the layering contracts (pyproject.toml) in make lint / make test; a dev
  # tool, pinned here as triton is (constraints.txt pins are the Pants lock's). 2.6 is the newest
  # whose rich requirement agrees with aiperf's (rich 14.1).
  $PIP install "import-linter==2.6" -c requirements/constraints.txt
  # pytest-xdist runs two test files at once in `make test` (build-support/test.sh): the suite
  # keeps one core busy on average, and the second file fills the other. A dev tool, pinned here.
  $PIP install "pytest-xdist==3.8.0" "execnet==2.1.2" -c requirements/constraints.txt
  # xgrammar masks tokens for structured outputs (engine) and checks grammars (router). Pinned
  # here, like triton, not in constraints.txt: the Pants lock does not carry it yet. The
  # constraints keep its dependencies (torch, transformers, numpy, pydantic) on our pins.
  $PIP install "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2" -c requirements/constraints.txt
  $PIP install -r requirements/base.txt -c requirements/constraints.txt
  # The 'nixl' meta package requires both CUDA variants; take the cu12 one only.
  # Its UCX backend runs on host memory on CPU machines.
  $PIP install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
  echo "$want" > "$stamp"
fi
# Source roots (PEP 420 namespace package 'tandem' spread over libs/ and services/*).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
{
  echo "$PWD/gen/python"
  echo "$PWD/libs"
  for d in services/*/; do echo "$PWD/${d%/}"; done
  echo "$PWD"
} > "$site/tandem-source-roots.pth"
build-support/codegen.sh
