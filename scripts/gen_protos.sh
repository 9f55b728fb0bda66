#!/usr/bin/env bash
# Regenerate the checked-in gRPC/protobuf stubs from protos/.
# The proto path mirrors the package path so generated imports resolve.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
python -m grpc_tools.protoc -Iprotos \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    protos/dsgd/proto/*.proto
