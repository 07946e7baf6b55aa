#!/usr/bin/env bash
# Record the checkout's commit and dirty flag in .git-state.json (git-ignored), for a copy of the
# tree that runs elsewhere (the GPU device tool, whose copy of .git can be stale): benchmarks run
# there with TANDEM_GIT_STATE=.git-state.json record it (benchmarks/common/results.py:git_info).
set -euo pipefail
cd "$(dirname "$0")/.."
dirty=false
[ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=true
printf '{"commit": "%s", "branch": "%s", "dirty": %s}\n' "$(git rev-parse HEAD)" \
  "$(git rev-parse --abbrev-ref HEAD)" "$dirty" > .git-state.json
cat .git-state.json
