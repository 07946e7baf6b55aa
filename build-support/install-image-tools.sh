#!/usr/bin/env bash
# Install what `make images` / `make test-images` need from Debian, if missing:
#   images:      mmdebstrap (base root filesystem), umoci (OCI assembly), skopeo (archives)
#   test-images: runc and podman from Debian, and podman-compose 1.6.0 from PyPI into
#                .tools/podman-compose (Debian's 1.0.3 drops `ipc:`/`pid:` and puts host-network
#                services on a bridge network too; see build-support/images/README.md)
# Idempotent: does nothing when everything is already there.
#   build-support/install-image-tools.sh [build|test]   (default: build)
set -euo pipefail
what=${1:-build}
case $what in
  build) cmds=(mmdebstrap umoci skopeo); pkgs=(mmdebstrap umoci skopeo) ;;
  test) cmds=(mmdebstrap umoci skopeo runc podman)
        pkgs=(mmdebstrap umoci skopeo runc podman) ;;
  *) echo "usage: $0 [build|test]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PODMAN_COMPOSE_VERSION=1.6.0
if [ "$what" = test ] && ! .tools/podman-compose/bin/podman-compose --version 2>/dev/null \
     | grep -q "podman-compose version $PODMAN_COMPOSE_VERSION"; then
  echo "[install-image-tools] podman-compose $PODMAN_COMPOSE_VERSION from PyPI into .tools/podman-compose"
  rm -rf .tools/podman-compose
  python3 -m venv .tools/podman-compose
  PIP_CONFIG_FILE=/dev/null .tools/podman-compose/bin/pip install -q --disable-pip-version-check \
    "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
missing=()
for c in "${cmds[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi

echo "[install-image-tools] missing: ${missing[*]}"
# Recommends are left out (apt-install-service.sh): only these packages' own binaries are used
# (podman recommends crun, which fails on this kind of machine; runc is configured instead), and
# podman's packaged system service is kept from running.
build-support/apt-install-service.sh install-image-tools podman "${pkgs[@]}"
for c in "${cmds[@]}"; do command -v "$c" >/dev/null || { echo "[install-image-tools] $c still missing" >&2; exit 1; }; done
echo "[install-image-tools] installed: ${pkgs[*]}"
