#!/usr/bin/env bash
# The Pants smoke step at the end of `make test`, so the Pants build cannot silently rot:
# bootstraps Pants if needed, runs the config library's and the proto contract's tests under
# Pants (the latter imports the Pants-generated tandem.v1 code), packages all four service PEX
# files, then build-support/pex_smoke.py runs them as a user would (each alone, outside the repo,
# in an empty environment): `--help`, then router + decode + prefill serving one disaggregated
# request over nixl with remote prefill forced, and the EPLB planner, all SERVING, all stopped
# cleanly. Runs without pantsd so that nothing is left running afterwards.
#   build-support/pants-smoke.sh [--build-only]
# --build-only stops after packaging (`make test` runs it beside the venv's set-up, and the PEX
# run afterwards, when the dev venv and the demo models exist).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
log() { echo "[pants-smoke] $*"; }
build_only=0
[ "${1:-}" = "--build-only" ] && build_only=1

build-support/pants-bootstrap.sh -q
log "pants test tests/unit/config:: tests/unit:protos + package services/{router,prefill,decode,eplb}::"
build-support/pants --no-pantsd --no-dynamic-ui \
  test package tests/unit/config:: tests/unit:protos \
  services/router:: services/prefill:: services/decode:: services/eplb::
t1=$(date +%s)
if [ $build_only = 1 ]; then
  log "built: $(cd dist && du -h tandem-*.pex | awk '{printf "%s %s  ", $2, $1}')"
  log "pants $(( t1 - t0 )) s"
  exit 0
fi
.venv/bin/python build-support/pex_smoke.py dist models
log "ok: $(cd dist && du -h tandem-*.pex | awk '{printf "%s %s  ", $2, $1}')"
log "pants $(( t1 - t0 )) s + PEX run $(( $(date +%s) - t1 )) s"
