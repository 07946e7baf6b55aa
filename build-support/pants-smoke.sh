#!/usr/bin/env bash
# The Pants smoke step at the end of `make test`, so the Pants build cannot silently rot:
# bootstraps Pants if needed, runs the config library's and the proto contract's tests under
# Pants (the latter imports the Pants-generated tandem.v1 code), packages the router PEX and
# starts it (--help, then --print-config) in an empty environment outside the repo.
# Runs without pantsd so that nothing is left running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
log() { echo "[pants-smoke] $*"; }

build-support/pants-bootstrap.sh -q
log "pants test tests/unit/config:: tests/unit:protos + package services/router::"
build-support/pants --no-pantsd --no-dynamic-ui \
  test package tests/unit/config:: tests/unit:protos services/router::

pex=$PWD/dist/tandem-router.pex
[ -x "$pex" ] || { log "FAIL: $pex was not built"; exit 1; }
# An empty environment and a foreign working directory: the PEX must carry all it needs.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
run_pex() { (cd "$scratch" && env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$scratch" "$pex" "$@"); }
help=$(run_pex --help)
grep -q "usage: python -m tandem.router" <<<"$help" \
  || { log "FAIL: router PEX --help printed:"; echo "$help"; exit 1; }
run_pex --print-config --port 0 >"$scratch/config.out" \
  || { log "FAIL: router PEX --print-config"; cat "$scratch/config.out"; exit 1; }
log "ok: $(du -h "$pex" | cut -f1) $pex starts (--help, --print-config); $(( $(date +%s) - t0 )) s"
