#!/usr/bin/env bash
# Generates the Python stubs (libs/gen) and the descriptor set the Envoy edge transcodes with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
googleapis=$($PY -c 'import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parents[2])')

rm -rf build/protodeps && mkdir -p build/protodeps/google/api build/protodeps/google/rpc
cp "$googleapis/google/api/annotations.proto" "$googleapis/google/api/http.proto" build/protodeps/google/api/
# Error details (google.rpc.BadRequest) travel in grpc-status-details-bin; the edge's transcoder can print
# them (and the edge read the field for `param`) only if their types are in its descriptor set.
cp "$googleapis/google/rpc/error_details.proto" build/protodeps/google/rpc/

rm -rf libs/gen && mkdir -p libs/gen
mapfile -t protos < <(cd protos && find sophia -name '*.proto' | sort)
$PY -m grpc_tools.protoc -I protos -I build/protodeps \
  --python_out=libs/gen --pyi_out=libs/gen --grpc_python_out=libs/gen "${protos[@]}"
$PY -m grpc_tools.protoc -I protos -I build/protodeps \
  --include_imports --include_source_info --descriptor_set_out=build/sophia.pb "${protos[@]}" \
  google/rpc/error_details.proto
echo "generated libs/gen and build/sophia.pb from ${#protos[@]} proto files"
# The edge refuses JSON fields the protos lack (the transcoder alone would drop them silently).
$PY deploy/envoy/gen_edge_schema.py
