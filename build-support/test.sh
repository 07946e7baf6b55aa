#!/usr/bin/env bash
# `make test`: everything a submission must pass, with independent work side by side.
#
#   beside each other from the start:
#     [setup]   the dev venv (build-support/setup.sh), then the demo checkpoints   (foreground)
#     [tools]   Prometheus + promtool and etcd from Debian, when missing           (background)
#     [pants]   Pants bootstrap, the config and proto tests under Pants, the four
#               service PEX files (build-support/pants-smoke.sh --build-only)     (background)
#   then:
#     [lint]    the layering contracts (import-linter)
#     [pytest]  the whole suite (tests/), two files at a time (pytest-xdist), the 15 slowest listed
#     [pex]     the PEX files run as a user would (build-support/pex_smoke.py)
#     [deploy]  the Kubernetes overlays, compose and every start command (validate_deploy.py)
#   and a table of each phase's time and the total.
#
# The background jobs mostly download and unpack (apt, PyPI, Pants' lock), so they overlap the
# venv's set-up well on a 2-core machine; their logs are under build/test-logs/ and are printed
# when they fail. Exits non-zero if any phase failed (all phases that can still run do run).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=build/test-logs
mkdir -p "$LOGS"
T0=$(date +%s)
declare -A START END RC
log() { echo "[test] $*"; }
begin() { START[$1]=$(date +%s); }
finish() { END[$1]=$(date +%s); RC[$1]=$2; }
mark() {  # mark NAME -> run the rest as phase NAME, recording its time and status
  local name=$1; shift
  begin "$name"
  "$@"
  finish "$name" $?
}

# --- beside each other -------------------------------------------------------------------------
begin tools
( build-support/install-prometheus.sh && build-support/install-etcd.sh ) > "$LOGS/tools.log" 2>&1 &
tools_pid=$!
begin pants
build-support/pants-smoke.sh --build-only > "$LOGS/pants.log" 2>&1 &
pants_pid=$!
log "started in the background: Debian tools (pid $tools_pid), Pants build (pid $pants_pid); logs in $LOGS/"

mark setup make --no-print-directory setup demo-models
wait "$tools_pid"; finish tools $?
if [ "${RC[tools]}" != 0 ]; then cat "$LOGS/tools.log"; else tail -2 "$LOGS/tools.log"; fi

# --- the suite -----------------------------------------------------------------------------------
ready=0
if [ "${RC[setup]}" = 0 ] && [ "${RC[tools]}" = 0 ]; then ready=1; fi
if [ $ready = 1 ]; then
  mark lint .venv/bin/lint-imports
  # Two test files at a time (pytest-xdist, whole files per worker so that module-scoped stacks
  # are shared): alone, the suite keeps about one of the two cores busy.
  mark pytest .venv/bin/python -m pytest -q -rs --durations=15 -n 2 --dist loadfile tests
else
  log "set-up failed: lint and pytest not run"
fi

wait "$pants_pid"; finish pants $?
if [ "${RC[pants]}" != 0 ]; then
  cat "$LOGS/pants.log"
else
  grep '^\[pants-smoke\]' "$LOGS/pants.log" || true
  if [ $ready = 1 ]; then mark pex .venv/bin/python build-support/pex_smoke.py dist models; fi
fi
if [ "${RC[setup]}" = 0 ]; then mark deploy .venv/bin/python build-support/validate_deploy.py; fi

# --- summary -------------------------------------------------------------------------------------
total=$(( $(date +%s) - T0 ))
failed=()
echo
log "phase      time     status"
for p in setup tools pants lint pytest pex deploy; do
  if [ -z "${START[$p]:-}" ] || [ -z "${END[$p]:-}" ]; then
    printf '[test] %-8s %8s  %s\n' "$p" "-" "not run"
    failed+=("$p")
    continue
  fi
  s=$(( END[$p] - START[$p] ))
  status=ok
  if [ "${RC[$p]}" != 0 ]; then status="FAILED (exit ${RC[$p]})"; failed+=("$p"); fi
  printf '[test] %-8s %4d:%02d  %s\n' "$p" $((s / 60)) $((s % 60)) "$status"
done
log "total $((total / 60)) min $((total % 60)) s (tools and pants ran beside setup and pytest)"
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "PASSED"
