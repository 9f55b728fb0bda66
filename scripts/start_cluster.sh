#!/usr/bin/env bash
# Start a local dsgd cluster on 127.0.0.1 (coordinator, parameter shards, workers)
# and train the bundled example to its target accuracy. All flags are optional;
# see `scripts/start_cluster.sh --help`.
set -euo pipefail
DSGD_EXTRAS=dev source "$(dirname "$0")/_env.sh"
exec python -m dsgd start "$@"
