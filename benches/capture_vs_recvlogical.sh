#!/usr/bin/env bash
# Capture throughput, side by side in one run: `walshift capture` into its durable buffer vs
# `pg_recvlogical` into a file, each draining an identical pgoutput slot to the same end LSN,
# on a throwaway cluster with workload W of the brief (1M changes in 100k transactions).
#
#   benches/capture_vs_recvlogical.sh                 # workload W, 5 runs per tool
#   benches/capture_vs_recvlogical.sh --runs 3 --changes 200000 --json
#
# Extra arguments go to `walshift bench capture` (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec ./target/release/walshift bench capture --runs 5 "$@"
