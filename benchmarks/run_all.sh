#!/usr/bin/env bash
# Every benchmark in one call (GPU: ~10 minutes by default), all JSON plus summary.md.
#   bash benchmarks/run_all.sh [--out DIR] [--tiny] [--workloads gpt2,resnet50] [--fresh-steps 30] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.run_all "$@"
