#!/usr/bin/env bash
# `make test-fresh`: `make test` as a new user on this machine would run it.
#
# Clones the current commit (HEAD: uncommitted changes are not part of it) into a new
# temporary directory and runs `make test` there with a scrubbed environment:
#   - a new, empty HOME: no pip, Hugging Face or Pants cache, nothing under ~/.config or
#     ~/.local; only the machine's pip configuration file is copied in (it says where packages
#     come from, e.g. a local mirror; it is configuration, not a cache);
#   - nothing from this checkout: no .venv, gen/, models/, .tools/ or .run/;
#   - only the variables that describe the machine: PATH, locale, terminal, TMPDIR, CA bundles,
#     proxies, PYENV_ROOT and PIP_* (no VIRTUAL_ENV, PYTHONPATH, HF_*, PANTS_*, TANDEM_*, ...).
# The clone is removed when `make test` passes and kept for inspection when it fails.
#   build-support/test-fresh.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
keep_dir=0
[ "${1:-}" = "--keep" ] && keep_dir=1
log() { echo "[test-fresh] $*"; }

commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  log "note: this checkout has uncommitted changes; they are NOT tested (only $commit is)"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-fresh.XXXXXX")
git clone --quiet --no-hardlinks "$PWD" "$work/tandem"
git -C "$work/tandem" checkout --quiet --detach "$commit"

home=$work/home
mkdir -p "$home"
for f in .config/pip/pip.conf .pip/pip.conf; do
  if [ -f "$HOME/$f" ]; then
    mkdir -p "$home/$(dirname "$f")"
    cp "$HOME/$f" "$home/$f"
  fi
done

vars=(HOME="$home")
for v in PATH LANG LC_ALL TERM TMPDIR PYENV_ROOT SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE CURL_CA_BUNDLE \
         http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  if [ -n "${!v:-}" ]; then vars+=("$v=${!v}"); fi
done
while IFS= read -r line; do vars+=("$line"); done < <(env | grep '^PIP_' || true)

log "clone of $commit in $work/tandem, HOME=$home; running make test"
t0=$(date +%s)
set +e
(cd "$work/tandem" && env -i "${vars[@]}" make test)
rc=$?
set -e
elapsed=$(( $(date +%s) - t0 ))
if [ "$rc" -eq 0 ]; then
  log "PASSED in $((elapsed / 60)) min $((elapsed % 60)) s (fresh clone of $commit)"
  if [ "$keep_dir" = 0 ]; then rm -rf "$work"; else log "kept $work"; fi
else
  log "FAILED (exit $rc) after $((elapsed / 60)) min $((elapsed % 60)) s; the clone is kept in $work/tandem"
fi
exit "$rc"
