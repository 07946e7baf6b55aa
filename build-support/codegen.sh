#!/usr/bin/env bash
# Generates Python protobuf/gRPC code from protos/ into gen/python (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
out=gen/python
newest_proto=$(find protos -name '*.proto' -newer "$out/.stamp" 2>/dev/null | head -1 || true)
if [ -f "$out/.stamp" ] && [ -z "$newest_proto" ]; then exit 0; fi
rm -rf "$out"; mkdir -p "$out"
.venv/bin/python -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  $(find protos -name '*.proto' | sort)
# A regular package (the rest of tandem is PEP 420 portions): import-linter's contracts name it.
echo '"""Generated protobuf / gRPC code of protos/tandem/v1 (make codegen)."""' > "$out/tandem/v1/__init__.py"
touch "$out/.stamp"
echo "[codegen] generated $(find "$out" -name '*_pb2*.py' | wc -l) modules into $out"
