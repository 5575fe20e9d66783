#!/usr/bin/env bash
# Every benchmark in one call, all JSON plus summary.md (the verdict on every target).
# The full GPU matrix needs more than one 10-minute call: see benchmarks/README.md.
#   bash benchmarks/run_all.sh [--out DIR] [--tiny] [--workloads gpt2,resnet50] [--only probe] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.run_all "$@"
