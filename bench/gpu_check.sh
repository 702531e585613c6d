#!/usr/bin/env bash
# One prepared device check (issue #26): writes ONE markdown file (default bench/gpu_check.md, or
# $OUT/gpu_check.md when $OUT is set) and a PNG of the loss curve beside it. About 7 minutes on one
# GPU; `--device cpu --tiny` runs in seconds (the test suite does that).
#
#   bench/gpu_check.sh [--device cuda|cpu] [--out FILE.md] [--tiny]
#
# On the device machine (repo root is the working directory, no internet): if there is no .venv,
# the system python3 must already have torch, timm and the package's dependencies; make the
# package importable with `pip install -e . --no-deps` (offline), then run `bench/gpu_check.sh`.
# Nothing here touches the network: when torch or xstars_models is missing, the check prints one
# line saying so and exits 2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
if [ -x "$root/.venv/bin/python" ]; then
    python="$root/.venv/bin/python"
fi
exec "$python" "$root/bench/gpu_check.py" "$@"
