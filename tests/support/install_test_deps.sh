#!/usr/bin/env bash
# Everything the test suite needs beyond `uv sync`; each step is idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/../.."
for step in tests/support/deps.d/*.sh; do
  [ -e "$step" ] || continue
  bash "$step"
done
